//! socat's VSOCK addresses: `VSOCK-LISTEN:<port>` (with `fork`,
//! `max-children=`, `backlog=`, `cid=`) and `VSOCK-CONNECT:<cid>:<port>`
//! (with the connect retries), the sockets between a VM and its host or an
//! enclave and its parent.

use super::*;

/// Any context id of this machine (VMADDR_CID_ANY), where a listener binds
/// unless `cid=` says.
const CID_ANY: u32 = u32::MAX;

fn number(input: &str, what: &str, text: &str) -> Result<u32, AddrError> {
    text.parse().map_err(|_| {
        invalid(
            input,
            format!(
                "`{text}` is not a VSOCK {what}; expected a number, as in VSOCK-CONNECT:2:5000"
            ),
        )
    })
}

pub(super) fn parse_vsock_listen(input: &str, rest: &str) -> Result<ListenAddr, AddrError> {
    let (port, options) = split_options(rest);
    let mut vsock = VsockAddress {
        cid: CID_ANY,
        port: number(input, "port", port)?,
    };
    let mut addr = ListenAddr::new(ListenEndpoint::Stdio(StdioMode::Both), input, true);
    for opt in socat_options(input, options) {
        let opt = opt?;
        match opt.key.as_str() {
            "fork" => addr.once = !opt.flag(input)?,
            "max-children" => addr.max_children = Some(max_children(input, &opt)?),
            "backlog" => addr.backlog = Some(backlog(input, &opt)?),
            "cid" => vsock.cid = number(input, "context id", opt.required(input)?)?,
            other => {
                refused_option(input, other)?;
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on VSOCK-LISTEN (supported: {VSOCK_LISTEN_OPTIONS})"
                    ),
                ));
            }
        }
    }
    addr.endpoint = ListenEndpoint::Vsock(vsock);
    Ok(addr)
}

pub(super) fn parse_vsock_target(input: &str, rest: &str) -> Result<TargetAddr, AddrError> {
    let (address, options) = split_options(rest);
    let Some((cid, port)) = address.split_once(':') else {
        return Err(invalid(
            input,
            "expected VSOCK-CONNECT:<cid>:<port>, for example VSOCK-CONNECT:2:5000 (CID 2 is the host)",
        ));
    };
    let mut addr = TargetAddr::new(
        TargetEndpoint::Vsock(VsockAddress {
            cid: number(input, "context id", cid)?,
            port: number(input, "port", port)?,
        }),
        input,
    );
    for opt in socat_options(input, options) {
        let opt = opt?;
        if connect_option(input, &opt, &mut addr)? {
            continue;
        }
        refused_option(input, &opt.key)?;
        return Err(invalid(
            input,
            format!(
                "address option `{}` is not supported by relay on VSOCK-CONNECT (supported: {VSOCK_CONNECT_OPTIONS})",
                opt.key
            ),
        ));
    }
    Ok(addr)
}
