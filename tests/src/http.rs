//! A minimal HTTP/1.0 GET (or HEAD): enough to fetch a file from nginx or
//! /metrics from relay over a stream the test already holds (maybe one made
//! inside a network namespace). HTTP/1.0 without keep-alive: the body ends
//! at EOF.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{Context, Result, bail};

/// Status and body of a response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    /// The value of header `name` (case-insensitive), if the head has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// Send `GET <path>` on `stream` and read the response to EOF.
pub fn get(stream: TcpStream, host: &str, path: &str) -> Result<Response> {
    request(stream, "GET", host, path)
}

/// Send `<method> <path>` on `stream` and read the response to EOF.
pub fn request(mut stream: TcpStream, method: &str, host: &str, path: &str) -> Result<Response> {
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("sending {method} {path}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the response to {method} {path}"))?;
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!(
            "{method} {path}: response has no header end; got {} bytes: {:?}",
            raw.len(),
            String::from_utf8_lossy(&raw)
        );
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no status code in {head:?}"))?;
    Ok(Response {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    })
}
