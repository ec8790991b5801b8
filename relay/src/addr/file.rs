//! socat's file addresses: `OPEN:<path>` (and its alias `FILE:`),
//! `CREATE:<path>`, `GOPEN:<path>`, `PIPE:<path>` and `PTY` (a new
//! pseudo-terminal, `link=` naming it), on either side, with
//! the open options scripts use (`creat`, `excl`, `append`, `trunc`,
//! `rdonly` / `wronly` / `rdwr`, `perm=`, `ignoreeof`) and, for a terminal
//! such as a serial line, `raw` and `echo=`. How a file is opened and read
//! is `forward::file`'s; this module only reads the address.

use super::*;

pub(super) const FILE_OPTIONS: &str = "creat, excl, append, trunc, rdonly, wronly, rdwr, perm=<octal> (mode=), ignoreeof, raw, echo=0|1; PTY: link=<path>, raw, echo=0|1";

/// How socat opens the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `OPEN:` / `FILE:`: an existing file (or one `creat` makes).
    Open,
    /// `CREATE:`: made or truncated, written only (socat's creat(2)).
    Create,
    /// `GOPEN:`: a UNIX socket at the path is connected to, anything else
    /// is opened as `OPEN:` would.
    Gopen,
    /// `PIPE:`: a named pipe, made if missing.
    Pipe,
    /// `PTY`: a new pseudo-terminal; relay holds its master side, and
    /// programs open the terminal (at `link=`, if given) as a serial line.
    Pty,
}

/// Which ways a file is opened. Unless an option says, the route decides:
/// both ways, or on a one-way route (`-u` / `-U`) only the way it is used,
/// as socat opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    WriteOnly,
    ReadWrite,
}

impl Access {
    pub fn reads(self) -> bool {
        self != Access::WriteOnly
    }

    pub fn writes(self) -> bool {
        self != Access::ReadOnly
    }
}

/// A file address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub path: PathBuf,
    pub kind: FileKind,
    /// `rdonly` / `wronly` / `rdwr`; `None`: as the route uses it.
    pub access: Option<Access>,
    /// `creat`: make the file if it is missing.
    pub create: bool,
    /// `excl`: with `creat`, fail if it exists.
    pub exclusive: bool,
    pub append: bool,
    pub truncate: bool,
    /// `perm=`: the permission bits of a file relay makes (before umask).
    pub perm: u32,
    /// `ignoreeof`: at the end of the file, wait and read again (`tail -f`).
    pub ignore_eof: bool,
    /// `raw`: a terminal is put in raw mode (no line editing, no signals).
    pub raw: bool,
    /// `echo=`: a terminal's echo on or off; `None`: as it is.
    pub echo: Option<bool>,
    /// `link=` (PTY): a symbolic link to the new terminal, made when it
    /// opens and removed when it closes.
    pub link: Option<PathBuf>,
}

impl FileSpec {
    /// The way the route uses this side, unless an option fixed it.
    pub fn access_for(&self, reads: bool, writes: bool) -> Access {
        if let Some(access) = self.access {
            return access;
        }
        match (self.kind, reads, writes) {
            (FileKind::Create, _, _) | (_, false, true) => Access::WriteOnly,
            (_, true, false) => Access::ReadOnly,
            _ => Access::ReadWrite,
        }
    }
}

pub(super) fn parse_file(input: &str, kind: FileKind, rest: &str) -> Result<FileSpec, AddrError> {
    let (path, options) = split_options(rest);
    if kind == FileKind::Pty && !path.is_empty() {
        return Err(invalid(
            input,
            "PTY takes no path: name the terminal with `PTY,link=<path>`",
        ));
    }
    if path.is_empty() && kind != FileKind::Pty {
        let why = if kind == FileKind::Pipe {
            "PIPE needs a path here (`PIPE:/run/x.fifo`): relay does not make unnamed pipes"
        } else {
            "the path is empty; expected for example `OPEN:/var/log/app.log`"
        };
        return Err(invalid(input, why));
    }
    let mut spec = FileSpec {
        path: PathBuf::from(path),
        kind,
        access: (kind == FileKind::Create).then_some(Access::WriteOnly),
        create: kind == FileKind::Create,
        exclusive: false,
        append: false,
        truncate: kind == FileKind::Create,
        perm: 0o666,
        ignore_eof: false,
        raw: false,
        echo: None,
        link: None,
    };
    for opt in socat_options(input, options) {
        let opt = opt?;
        if kind == FileKind::Pty && !["link", "raw", "echo"].contains(&opt.key.as_str()) {
            refused_option(input, &opt.key)?;
            return Err(invalid(
                input,
                format!(
                    "address option `{}` is not supported by relay on PTY (supported: link=<path>, raw, echo=0|1)",
                    opt.key
                ),
            ));
        }
        match opt.key.as_str() {
            "creat" | "create" => spec.create = opt.flag(input)?,
            "excl" => spec.exclusive = opt.flag(input)?,
            "append" => spec.append = opt.flag(input)?,
            "trunc" => spec.truncate = opt.flag(input)?,
            "rdonly" | "wronly" | "rdwr" if opt.flag(input)? => {
                let access = match opt.key.as_str() {
                    "rdonly" => Access::ReadOnly,
                    "wronly" => Access::WriteOnly,
                    _ => Access::ReadWrite,
                };
                if kind == FileKind::Create && access != Access::WriteOnly {
                    return Err(invalid(
                        input,
                        "CREATE opens for writing only: use OPEN:<path>,creat to read the file too",
                    ));
                }
                spec.access = Some(access);
            }
            "rdonly" | "wronly" | "rdwr" => {}
            "perm" | "mode" => {
                let value = opt.required(input)?;
                spec.perm = u32::from_str_radix(value, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        invalid(
                            input,
                            format!(
                                "`{}={value}`: expected octal permission bits such as 0640",
                                opt.key
                            ),
                        )
                    })?;
            }
            "ignoreeof" => spec.ignore_eof = opt.flag(input)?,
            "link" if kind == FileKind::Pty => {
                spec.link = Some(PathBuf::from(opt.required(input)?));
            }
            "raw" => spec.raw = opt.flag(input)?,
            "echo" => spec.echo = Some(opt.flag(input)?),
            other => {
                refused_option(input, other)?;
                return Err(invalid(
                    input,
                    format!(
                        "address option `{other}` is not supported by relay on a file address (supported: {FILE_OPTIONS})"
                    ),
                ));
            }
        }
    }
    if spec.exclusive && !spec.create {
        return Err(invalid(
            input,
            "`excl` fails only when `creat` would make the file: add `creat`, or drop `excl`",
        ));
    }
    Ok(spec)
}

/// A file address where a listener would be: the one connection of the
/// route, as STDIO's (`relay -u OPEN:/var/log/app.log TCP:host:514`).
pub(super) fn parse_file_listen(
    input: &str,
    kind: FileKind,
    rest: &str,
) -> Result<ListenAddr, AddrError> {
    Ok(ListenAddr::new(
        ListenEndpoint::File(parse_file(input, kind, rest)?),
        input,
        true,
    ))
}

/// A file address as the target: opened for each connection.
pub(super) fn parse_file_target(
    input: &str,
    kind: FileKind,
    rest: &str,
) -> Result<TargetAddr, AddrError> {
    Ok(TargetAddr::new(
        TargetEndpoint::File(parse_file(input, kind, rest)?),
        input,
    ))
}
