//! socat's VSOCK addresses, as far as a machine without a VSOCK loopback
//! can take them: this VM has a virtio VSOCK device but no loopback
//! transport (CONFIG_VSOCKETS_LOOPBACK is off), so nothing here can
//! connect to a VSOCK listener of its own, and connecting to the host
//! (CID 2) would leave the machine. What is checked: `VSOCK-LISTEN` holds
//! a real AF_VSOCK socket bound to its port (a second bind is refused
//! while relay runs, and succeeds after it exits), and `VSOCK-CONNECT` to
//! this machine's own CID reaches the kernel, whose refusal (no device
//! routes a guest to itself) is reported and counted as connect_error,
//! the client reset.

use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, bind, socket};
use relay_tests::peers::{EchoServer, expect_close};
use relay_tests::ports::free_port;
use relay_tests::wait::poll_until;
use relay_tests::{RelayCmd, gate};

const TIMEOUT: Duration = Duration::from_secs(10);
/// VMADDR_CID_ANY.
const CID_ANY: u32 = u32::MAX;

/// This machine's context id (IOCTL_VM_SOCKETS_GET_LOCAL_CID), or why
/// there is none.
fn local_cid() -> Result<u32, String> {
    let dev = std::fs::File::open("/dev/vsock").map_err(|e| format!("/dev/vsock: {e}"))?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 to the pointer given; `dev` is open.
    let rc = unsafe { nix::libc::ioctl(dev.as_raw_fd(), 0x7b9, &mut cid) };
    if rc != 0 {
        return Err(format!(
            "IOCTL_VM_SOCKETS_GET_LOCAL_CID: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cid)
}

/// Binds a VSOCK stream socket to `port` on any CID, as relay's listener does.
fn bind_vsock(port: u32) -> nix::Result<std::os::fd::OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, port))?;
    Ok(fd)
}

#[test]
fn vsock_listen_binds_a_real_vsock_socket() -> Result<()> {
    if let Err(why) = local_cid() {
        gate::report_skip(&format!("no VSOCK device here ({why})"));
        return Ok(());
    }
    let echo = EchoServer::start()?;
    // A port of the VSOCK space that nothing here uses: the TCP one's.
    let port = u32::from(free_port()?);
    let relay = RelayCmd::raw(&[
        &format!("VSOCK-LISTEN:{port},fork"),
        &format!("TCP:{}", echo.addr()),
    ])
    .with_metrics()?
    .spawn()?;
    poll_until("relay's listening line", TIMEOUT, || {
        Ok(relay
            .stderr()
            .contains(&format!("listening on vsock:{CID_ANY}:{port}"))
            .then_some(()))
    })?;
    match bind_vsock(port) {
        Err(nix::errno::Errno::EADDRINUSE) => {}
        other => anyhow::bail!("binding VSOCK port {port} beside relay's listener: {other:?}"),
    }
    drop(relay);
    poll_until("the port free again once relay is gone", TIMEOUT, || {
        Ok(bind_vsock(port).ok().map(drop))
    })
    .context("relay's VSOCK socket outlived it")?;
    Ok(())
}

#[test]
fn vsock_connect_reports_what_the_kernel_says() -> Result<()> {
    let cid = match local_cid() {
        Ok(cid) => cid,
        Err(why) => {
            gate::report_skip(&format!("no VSOCK device here ({why})"));
            return Ok(());
        }
    };
    let relay = RelayCmd::loopback_to(format!("VSOCK-CONNECT:{cid}:5000"))?.spawn()?;
    let mut client = relay.connect()?;
    expect_close(&mut client, TIMEOUT)?;
    relay.wait_outcome("connect_error", 1.0, TIMEOUT)?;
    let log = relay.stderr();
    ensure!(
        log.contains(&format!("cannot connect to vsock:{cid}:5000")),
        "the log names the VSOCK address and the kernel's answer:\n{log}"
    );
    Ok(())
}
