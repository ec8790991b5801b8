//! The capture filter: a small tcpdump-like language, parsed and compiled
//! into the rule table the kernel program evaluates (`filter_rules` in
//! observe.bpf.c), so a new filter needs no new eBPF object.
//!
//! ```text
//! expr      := term ( ("or" | "||") term )*
//! term      := factor ( ["and" | "&&"] factor )*     (juxtaposition is `and`)
//! factor    := ("not" | "!") factor | "(" expr ")" | primitive
//! primitive := tcp | udp | icmp | icmp6 | ip | ip6 | inbound | outbound
//!            | [src | dst] host <addr>      | [src | dst] net <addr>/<len>
//!            | [src | dst] port <n>         | [src | dst] portrange <n>-<m>
//! ```
//!
//! The kernel evaluates a disjunction of conjunctions (each rule possibly
//! negated), so the expression is turned into that form here: `not` is
//! pushed down to the primitives, `and` is distributed over `or`. A filter
//! that needs more than [`MAX_RULES`] rules that way is refused.
//!
//! Every step is bounded before it runs, so a hostile or mistaken filter is
//! refused in bounded time and memory rather than exhausting either: the
//! text is at most [`MAX_FILTER_LEN`] bytes, `(` and `not` nest at most
//! [`MAX_NESTING`] deep, and the expansion computes the size of each
//! product before building it, never holding more than [`MAX_RULES`] rules.
//! These limits belong to the kernel table, not to this grammar: a
//! front end that replaces this parser (libpcap, issue 13) keeps them.

use std::net::IpAddr;

use thiserror::Error;

use super::maps::FilterRule;

/// Rules the kernel program holds (`RELAY_FILTER_MAX`).
pub const MAX_RULES: usize = 32;

/// The longest filter text accepted, in bytes. Every primitive takes at
/// least one of the [`MAX_RULES`] rules and the longest primitive is about
/// 60 bytes (`src net <full IPv6>/128`), so any filter the kernel can hold
/// fits in a quarter of this, with room for operators and layout; refusing
/// longer text up front bounds the tokens held before anything is checked.
pub const MAX_FILTER_LEN: usize = 8192;

/// How deep `(` and `not` may nest (counted together). The parser and the
/// expansion recurse once per level, so this bounds their stack (10,000
/// nested parentheses overflowed it); no sensible filter needs more than
/// a handful of levels, and a chain of `not`s can always be shortened.
pub const MAX_NESTING: usize = 64;

/// The deepest expression tree the expansion walks: the nesting above plus
/// one `and`/`or` node per primitive beyond the first. The parser never
/// builds a deeper one; the check guards any other front end.
const MAX_TREE_DEPTH: usize = MAX_NESTING + MAX_RULES;

/// What a refusal for size tells the user to do instead.
const SIMPLER: &str = "use fewer alternatives, or capture wider and filter in Wireshark";

// enum relay_filter_kind, relay_filter_end, relay_direction, relay_proto
const KIND_PROTO: u8 = 1;
const KIND_FAMILY: u8 = 2;
const KIND_NET: u8 = 3;
const KIND_PORT: u8 = 4;
const KIND_DIRECTION: u8 = 5;
const END_EITHER: u8 = 0;
const END_SRC: u8 = 1;
const END_DST: u8 = 2;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("invalid filter: unexpected `{token}` (word {position}); {expected}")]
    Unexpected {
        token: String,
        position: usize,
        expected: &'static str,
    },
    #[error("invalid filter: it ends where {expected}")]
    Truncated { expected: &'static str },
    #[error("invalid filter: `{token}` (word {position}) {why}")]
    BadValue {
        token: String,
        position: usize,
        why: String,
    },
    #[error(
        "invalid filter: it is empty; write an expression such as `tcp port 80`, or leave the filter out to keep every packet"
    )]
    Empty,
    #[error(
        "filter too long: {len} bytes, at most {MAX_FILTER_LEN} are accepted (the kernel program holds {MAX_RULES} rules, far less text); {SIMPLER}"
    )]
    TooLong { len: usize },
    #[error(
        "filter nested too deeply: `{token}` (word {position}) opens level {}, `(` and `not` nest at most {MAX_NESTING} deep; remove redundant parentheses and double negations",
        MAX_NESTING + 1
    )]
    TooDeep { token: String, position: usize },
    #[error(
        "filter too complex: `{token}` (word {position}) is primitive {}, and each primitive takes at least one of the {MAX_RULES} rules the kernel program holds; {SIMPLER}",
        MAX_RULES + 1
    )]
    TooManyPrimitives { token: String, position: usize },
    #[error(
        "filter too complex: it expands to more than {MAX_RULES} rules (the kernel program holds {MAX_RULES}) once `not` is pushed down and `and` distributed over `or`; {SIMPLER}"
    )]
    TooComplex,
}

/// One primitive, as the kernel tests it (everything of a [`FilterRule`]
/// but its term and negation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Primitive(FilterRule);

#[derive(Debug, Clone)]
enum Expr {
    Primitive(Primitive),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// A compiled filter: the rules, ready for `filter_rules`/`filter_len`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    text: String,
    rules: Vec<FilterRule>,
}

impl Filter {
    /// Everything passes.
    pub fn all() -> Self {
        Filter::default()
    }

    pub fn parse(text: &str) -> Result<Self, FilterError> {
        // Checked before tokenizing, so the tokens held are bounded too.
        if text.len() > MAX_FILTER_LEN {
            return Err(FilterError::TooLong { len: text.len() });
        }
        let tokens = tokenize(text);
        // An empty --filter is almost always a shell variable that expanded
        // to nothing; capturing everything instead would be a silent surprise.
        if tokens.is_empty() {
            return Err(FilterError::Empty);
        }
        let mut parser = Parser {
            tokens,
            at: 0,
            depth: 0,
            primitives: 0,
        };
        let expr = parser.expr()?;
        if let Some(token) = parser.peek() {
            return Err(FilterError::Unexpected {
                token: token.to_string(),
                position: parser.at + 1,
                expected: "expected `and`, `or` or the end",
            });
        }
        let terms = dnf(&expr, false, 0)?;
        let count = rules(&terms);
        // dnf() holds at most MAX_RULES rules and every term at least one;
        // checked again because the kernel's term number is a u8.
        if count > MAX_RULES || terms.len() > usize::from(u8::MAX) {
            return Err(FilterError::TooComplex);
        }
        let mut compiled = Vec::with_capacity(count);
        for (term, conjunction) in terms.iter().enumerate() {
            for (primitive, negate) in conjunction {
                let mut rule = primitive.0;
                rule.term =
                    u8::try_from(term).expect("invariant: at most 255 terms, checked above");
                rule.negate = u8::from(*negate);
                compiled.push(rule);
            }
        }
        Ok(Filter {
            text: text.trim().to_string(),
            rules: compiled,
        })
    }

    /// The rule table, [`MAX_RULES`] long (the unused tail zeroed), and how
    /// many rules of it count.
    pub fn table(&self) -> ([FilterRule; MAX_RULES], u32) {
        let mut table = [FilterRule::default(); MAX_RULES];
        table[..self.rules.len()].copy_from_slice(&self.rules);
        let len = u32::try_from(self.rules.len()).expect("invariant: at most MAX_RULES rules");
        (table, len)
    }

    /// The filter as the user wrote it ("" for everything).
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl std::str::FromStr for Filter {
    type Err = FilterError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Filter::parse(text)
    }
}

fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, tokens: &mut Vec<String>| {
        if !word.is_empty() {
            tokens.push(std::mem::take(word));
        }
    };
    for c in text.chars() {
        match c {
            '(' | ')' => {
                flush(&mut word, &mut tokens);
                tokens.push(c.to_string());
            }
            c if c.is_whitespace() => flush(&mut word, &mut tokens),
            // `!tcp` is `! tcp`.
            '!' if word.is_empty() => tokens.push("!".into()),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut tokens);
    tokens
}

struct Parser {
    tokens: Vec<String>,
    at: usize,
    /// `(` and `not` open around the token being parsed.
    depth: usize,
    /// Primitives parsed so far.
    primitives: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.at).map(String::as_str)
    }

    fn next(&mut self, expected: &'static str) -> Result<(String, usize), FilterError> {
        let token = self
            .tokens
            .get(self.at)
            .cloned()
            .ok_or(FilterError::Truncated { expected })?;
        self.at += 1;
        Ok((token, self.at))
    }

    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.term()?;
        while matches!(self.peek(), Some("or" | "||")) {
            self.at += 1;
            left = Expr::Or(Box::new(left), Box::new(self.term()?));
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.factor()?;
        loop {
            match self.peek() {
                Some("and" | "&&") => self.at += 1,
                // As in tcpdump, `tcp port 80` is `tcp and port 80`.
                Some(token) if !matches!(token, "or" | "||" | ")") => {}
                _ => break,
            }
            left = Expr::And(Box::new(left), Box::new(self.factor()?));
        }
        Ok(left)
    }

    fn factor(&mut self) -> Result<Expr, FilterError> {
        const PRIMITIVE: &str = "expected a primitive (tcp, udp, icmp, ip, ip6, inbound, outbound, [src|dst] host|net|port|portrange ...), `not` or `(`";
        let (token, position) = self.next(PRIMITIVE)?;
        let rule = |kind, value| {
            Ok(Expr::Primitive(Primitive(FilterRule {
                kind,
                value,
                ..FilterRule::default()
            })))
        };
        if matches!(token.as_str(), "not" | "!" | "(") {
            // Both recurse: the depth is checked before, so the stack is bounded.
            if self.depth >= MAX_NESTING {
                return Err(FilterError::TooDeep { token, position });
            }
            self.depth += 1;
            let nested = self.nested(&token);
            self.depth -= 1;
            return nested;
        }
        // Each primitive takes at least one rule (the expansion copies
        // primitives, never drops one), so more than MAX_RULES of them can
        // be refused here, before the tree grows.
        self.primitives += 1;
        if self.primitives > MAX_RULES {
            return Err(FilterError::TooManyPrimitives { token, position });
        }
        match token.as_str() {
            "tcp" => rule(KIND_PROTO, 0),
            "udp" => rule(KIND_PROTO, 1),
            "icmp" | "icmp6" => rule(KIND_PROTO, 2),
            "ip" => rule(KIND_FAMILY, 4),
            "ip6" => rule(KIND_FAMILY, 6),
            "inbound" | "ingress" => rule(KIND_DIRECTION, 0),
            "outbound" | "egress" => rule(KIND_DIRECTION, 1),
            "src" => self.endpoint(END_SRC),
            "dst" => self.endpoint(END_DST),
            "host" | "net" | "port" | "portrange" => {
                self.at -= 1;
                self.endpoint(END_EITHER)
            }
            _ => Err(FilterError::Unexpected {
                token,
                position,
                expected: PRIMITIVE,
            }),
        }
    }

    /// What follows `not` or `(` (`opened`).
    fn nested(&mut self, opened: &str) -> Result<Expr, FilterError> {
        if opened != "(" {
            return Ok(Expr::Not(Box::new(self.factor()?)));
        }
        let inner = self.expr()?;
        let (close, position) = self.next("expected `)`")?;
        if close != ")" {
            return Err(FilterError::Unexpected {
                token: close,
                position,
                expected: "expected `)`",
            });
        }
        Ok(inner)
    }

    /// `host|net|port|portrange <value>`, after an optional `src`/`dst`.
    fn endpoint(&mut self, end: u8) -> Result<Expr, FilterError> {
        const WHAT: &str = "expected host, net, port or portrange";
        let (what, position) = self.next(WHAT)?;
        let (value, value_at) = self.next("expected a value after host, net, port or portrange")?;
        let bad = |why: String| FilterError::BadValue {
            token: value.clone(),
            position: value_at,
            why,
        };
        let mut rule = FilterRule {
            end,
            ..FilterRule::default()
        };
        match what.as_str() {
            "host" => {
                let addr: IpAddr = value
                    .parse()
                    .map_err(|_| bad("is not an IPv4 or IPv6 address".into()))?;
                net_rule(&mut rule, addr, if addr.is_ipv4() { 32 } else { 128 });
            }
            "net" => {
                let (addr, len) = value
                    .split_once('/')
                    .ok_or_else(|| bad("is not <address>/<prefix length>".into()))?;
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| bad("is not an IPv4 or IPv6 network".into()))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let len: u8 = len
                    .parse()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| bad(format!("has a prefix length outside 0-{max}")))?;
                if !net_rule(&mut rule, addr, len) {
                    return Err(bad(format!("has host bits set beyond /{len}")));
                }
            }
            "port" => {
                let port =
                    parse_port(&value).ok_or_else(|| bad("is not a port (0-65535)".into()))?;
                rule.kind = KIND_PORT;
                (rule.port_lo, rule.port_hi) = (port, port);
            }
            "portrange" => {
                let range = value.split_once('-').and_then(|(lo, hi)| {
                    Some((parse_port(lo)?, parse_port(hi)?)).filter(|(lo, hi)| lo <= hi)
                });
                let (lo, hi) =
                    range.ok_or_else(|| bad("is not a port range <low>-<high>".into()))?;
                rule.kind = KIND_PORT;
                (rule.port_lo, rule.port_hi) = (lo, hi);
            }
            _ => {
                return Err(FilterError::Unexpected {
                    token: what,
                    position,
                    expected: WHAT,
                });
            }
        }
        Ok(Expr::Primitive(Primitive(rule)))
    }
}

fn parse_port(text: &str) -> Option<u16> {
    text.parse().ok()
}

/// Fills a network rule; false when `addr` has bits set beyond `len`.
fn net_rule(rule: &mut FilterRule, addr: IpAddr, len: u8) -> bool {
    let (bytes, family): (Vec<u8>, u8) = match addr {
        IpAddr::V4(v4) => (v4.octets().to_vec(), 4),
        IpAddr::V6(v6) => (v6.octets().to_vec(), 6),
    };
    let mut addr_bytes = [0u8; 16];
    let mut mask_bytes = [0u8; 16];
    addr_bytes[..bytes.len()].copy_from_slice(&bytes);
    for (i, m) in mask_bytes.iter_mut().take(bytes.len()).enumerate() {
        let bits = usize::from(len).saturating_sub(i * 8).min(8);
        *m = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    let exact = addr_bytes.iter().zip(&mask_bytes).all(|(a, m)| a & !m == 0);
    // Words in memory order, as the kernel holds addresses (network order).
    for i in 0..4 {
        let word = |b: &[u8; 16]| {
            u32::from_ne_bytes(
                b[i * 4..i * 4 + 4]
                    .try_into()
                    .expect("invariant: 4-byte chunk"),
            )
        };
        rule.mask[i] = word(&mask_bytes);
        rule.addr[i] = word(&addr_bytes) & rule.mask[i];
    }
    rule.kind = KIND_NET;
    rule.family = family;
    exact
}

/// A disjunction of conjunctions of (primitive, negated).
type Dnf = Vec<Vec<(Primitive, bool)>>;

/// Rules a [`Dnf`] takes in the kernel table.
fn rules(terms: &Dnf) -> usize {
    terms.iter().map(Vec::len).sum()
}

/// The expression as OR of ANDs of (primitive, negated), `depth` levels
/// down the tree; refused as soon as any part needs more than
/// [`MAX_RULES`] rules. Rules only grow on the way up (a product has at
/// least the rules of each side, a union their sum), so a part over the
/// limit means the whole is, and no part ever holds more than the limit.
fn dnf(expr: &Expr, negated: bool, depth: usize) -> Result<Dnf, FilterError> {
    if depth > MAX_TREE_DEPTH {
        return Err(FilterError::TooComplex);
    }
    let next = depth + 1;
    let terms = match (expr, negated) {
        (Expr::Primitive(p), _) => vec![vec![(*p, negated)]],
        (Expr::Not(inner), _) => dnf(inner, !negated, next)?,
        (Expr::And(a, b), false) | (Expr::Or(a, b), true) => {
            let (a, b) = (dnf(a, negated, next)?, dnf(b, negated, next)?);
            // Every term of a meets every term of b: each term of a appears
            // |b| times and each of b |a| times. Sized before it is built,
            // saturating, so 2^20 terms are refused, not allocated.
            let size = a
                .len()
                .saturating_mul(rules(&b))
                .saturating_add(b.len().saturating_mul(rules(&a)));
            if size > MAX_RULES {
                return Err(FilterError::TooComplex);
            }
            let mut out = Vec::with_capacity(a.len() * b.len());
            for x in &a {
                for y in &b {
                    out.push(x.iter().chain(y).copied().collect());
                }
            }
            out
        }
        (Expr::Or(a, b), false) | (Expr::And(a, b), true) => {
            let mut terms = dnf(a, negated, next)?;
            terms.extend(dnf(b, negated, next)?);
            terms
        }
    };
    if rules(&terms) > MAX_RULES {
        return Err(FilterError::TooComplex);
    }
    Ok(terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet as the kernel program sees it, for a Rust model of its evaluation.
    struct Pkt {
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        sport: u16,
        dport: u16,
        inbound: bool,
    }

    fn words(addr: IpAddr) -> [u32; 4] {
        let mut bytes = [0u8; 16];
        match addr {
            IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()),
        }
        std::array::from_fn(|i| u32::from_ne_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()))
    }

    /// The same evaluation as filter_matches() in observe.bpf.c.
    fn eval(filter: &Filter, p: &Pkt) -> bool {
        let family = if p.src.is_ipv4() { 4 } else { 6 };
        let net = |r: &FilterRule, a: IpAddr| {
            let w = words(a);
            (0..4).all(|i| w[i] & r.mask[i] == r.addr[i])
        };
        let rule = |r: &FilterRule| match r.kind {
            KIND_PROTO => [6, 17, 1].get(usize::from(r.value)) == Some(&p.proto),
            KIND_FAMILY => r.value == family,
            KIND_NET => {
                r.family == family
                    && match r.end {
                        END_SRC => net(r, p.src),
                        END_DST => net(r, p.dst),
                        _ => net(r, p.src) || net(r, p.dst),
                    }
            }
            KIND_PORT => {
                let inr = |port: u16| port >= r.port_lo && port <= r.port_hi;
                matches!(p.proto, 6 | 17)
                    && match r.end {
                        END_SRC => inr(p.sport),
                        END_DST => inr(p.dport),
                        _ => inr(p.sport) || inr(p.dport),
                    }
            }
            KIND_DIRECTION => (r.value == 0) == p.inbound,
            _ => false,
        };
        if filter.rules.is_empty() {
            return true;
        }
        let mut term = 0;
        let mut ok = true;
        for r in &filter.rules {
            if r.term != term {
                if ok {
                    return true;
                }
                term = r.term;
                ok = true;
            }
            if ok && rule(r) == (r.negate != 0) {
                ok = false;
            }
        }
        ok
    }

    fn pkt(src: &str, dst: &str, proto: u8, sport: u16, dport: u16, inbound: bool) -> Pkt {
        Pkt {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            sport,
            dport,
            inbound,
        }
    }

    #[test]
    fn primitives_and_combinations_select_what_they_say() {
        let web = pkt("10.0.0.1", "10.0.0.2", 6, 40000, 80, true);
        let dns = pkt("10.0.0.2", "192.0.2.53", 17, 5353, 53, false);
        let v6 = pkt("2001:db8::1", "2001:db8:1::2", 6, 443, 50000, false);
        let cases: [(&str, [bool; 3]); 16] = [
            ("tcp", [true, false, true]),
            ("udp", [false, true, false]),
            ("ip6", [false, false, true]),
            ("host 10.0.0.2", [true, true, false]),
            ("src host 10.0.0.2", [false, true, false]),
            ("dst net 192.0.2.0/24", [false, true, false]),
            ("net 2001:db8:1::/48", [false, false, true]),
            ("port 80", [true, false, false]),
            ("dst port 53", [false, true, false]),
            ("src portrange 400-500", [false, false, true]),
            ("inbound", [true, false, false]),
            ("not tcp", [false, true, false]),
            ("tcp and not port 80", [false, false, true]),
            ("udp or (tcp and inbound)", [true, true, false]),
            ("!(port 80 || port 53) && outbound", [false, false, true]),
            ("tcp port 80", [true, false, false]),
        ];
        for (text, expected) in cases {
            let filter = Filter::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let got = [&web, &dns, &v6].map(|p| eval(&filter, p));
            assert_eq!(got, expected, "filter {text:?}");
        }
        // No --filter at all keeps everything.
        let all = Filter::all();
        assert_eq!([&web, &dns, &v6].map(|p| eval(&all, p)), [true; 3]);
    }

    #[test]
    fn bad_filters_name_the_token() {
        let err = |text: &str| Filter::parse(text).unwrap_err().to_string();
        assert!(
            err("tcp and bogus").contains("`bogus` (word 3)"),
            "{}",
            err("tcp and bogus")
        );
        assert!(err("host 10.0.0.300").contains("`10.0.0.300`"));
        assert!(err("net 10.0.0.1/24").contains("host bits"));
        assert!(err("port 70000").contains("`70000`"));
        assert!(err("tcp and").contains("ends where"));
        assert!(err("(tcp").contains("expected `)`"));
        assert!(err("tcp )").contains("`)` (word 2)"), "{}", err("tcp )"));
    }

    #[test]
    fn expansion_beyond_the_kernel_table_is_refused() {
        // (a or b) and (c or d) and ... : 2^6 terms of 6 rules.
        let text = (0..6)
            .map(|i| format!("(port {i} or host 10.0.0.{i})"))
            .collect::<Vec<_>>()
            .join(" and ");
        assert_eq!(Filter::parse(&text), Err(FilterError::TooComplex));
    }

    /// `(port 1 or port 2) and (port 3 or port 4) and ...`, `groups` long.
    fn groups(groups: usize) -> String {
        (0..groups)
            .map(|i| format!("(port {} or port {})", 2 * i + 1, 2 * i + 2))
            .collect::<Vec<_>>()
            .join(" and ")
    }

    #[test]
    fn products_of_many_alternatives_are_refused_without_being_built() {
        // 20 groups took 1.5 GB and 40 would never finish: refused while
        // parsing (more primitives than rules) ...
        for n in [20, 40] {
            let err = Filter::parse(&groups(n)).unwrap_err();
            assert!(
                matches!(err, FilterError::TooManyPrimitives { .. }),
                "{n} groups: {err}"
            );
            assert!(err.to_string().contains("32 rules"), "{err}");
        }
        // ... and 16 groups, 32 primitives but 2^16 terms, by the expansion,
        // which sizes each product before building it.
        let err = Filter::parse(&groups(16)).unwrap_err();
        assert_eq!(err, FilterError::TooComplex);
        assert!(err.to_string().contains("more than 32 rules"), "{err}");
        assert!(err.to_string().contains("Wireshark"), "{err}");
    }

    #[test]
    fn the_expansion_is_bounded_whatever_tree_it_is_given() {
        // A front end other than this parser (libpcap, issue 13) may hand
        // over a tree with no primitive limit: 40 groups, 2^40 terms.
        let port = |n: u16| {
            Expr::Primitive(Primitive(FilterRule {
                kind: KIND_PORT,
                port_lo: n,
                port_hi: n,
                ..FilterRule::default()
            }))
        };
        let group = |i: u16| Expr::Or(Box::new(port(2 * i)), Box::new(port(2 * i + 1)));
        let tree = (1..40).fold(group(0), |acc, i| {
            Expr::And(Box::new(acc), Box::new(group(i)))
        });
        assert_eq!(dnf(&tree, false, 0).unwrap_err(), FilterError::TooComplex);
        // `not` turns it into a union of 80 single rules: refused as well.
        assert_eq!(dnf(&tree, true, 0).unwrap_err(), FilterError::TooComplex);
        // And a chain deeper than any parse the parser allows.
        let deep = (0..10_000).fold(port(1), |acc, _| Expr::Not(Box::new(acc)));
        assert_eq!(dnf(&deep, false, 0).unwrap_err(), FilterError::TooComplex);
        // Dropping a 10,000-deep Box chain recurses too; unwind it by hand
        // so the test checks dnf(), not the test thread's stack.
        let mut deep = deep;
        while let Expr::Not(inner) = deep {
            deep = *inner;
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let parens = |n: usize| format!("{}tcp{}", "(".repeat(n), ")".repeat(n));
        let nots = |n: usize, word: &str| format!("{}tcp", word.repeat(n));
        // At the limit: accepted, and the same as plain `tcp` (an even
        // number of `not`s).
        let tcp = Filter::parse("tcp").unwrap();
        for text in [parens(MAX_NESTING), nots(MAX_NESTING, "not ")] {
            assert_eq!(Filter::parse(&text).unwrap().rules, tcp.rules, "{text}");
        }
        // One past it, written each way: the error names the word and the limit.
        for (text, token, position) in [
            (parens(MAX_NESTING + 1), "(", MAX_NESTING + 1),
            (nots(MAX_NESTING + 1, "! "), "!", MAX_NESTING + 1),
            (nots(MAX_NESTING + 1, "not "), "not", MAX_NESTING + 1),
            (parens(1000), "(", MAX_NESTING + 1),
            (
                format!("{}tcp", "not (".repeat(500)),
                "not",
                MAX_NESTING + 1,
            ),
        ] {
            let err = Filter::parse(&text).unwrap_err();
            assert_eq!(
                err,
                FilterError::TooDeep {
                    token: token.into(),
                    position
                },
                "{}...",
                &text[..20]
            );
            assert!(err.to_string().contains("at most 64 deep"), "{err}");
        }
        // What crashed relay: 10,000 parentheses, 30,000 nots (longer than
        // any filter accepted, so refused before they are even tokenized),
        // 30,000 `!` (short enough to reach the parser).
        let err = Filter::parse(&parens(10_000)).unwrap_err();
        assert_eq!(err, FilterError::TooLong { len: 20_003 });
        assert!(err.to_string().contains("at most 8192"), "{err}");
        let err = Filter::parse(&nots(30_000, "not ")).unwrap_err();
        assert!(matches!(err, FilterError::TooLong { .. }), "{err}");
        let err = Filter::parse(&nots(8000, "!")).unwrap_err();
        assert!(matches!(err, FilterError::TooDeep { .. }), "{err}");
    }

    #[test]
    fn an_empty_filter_is_refused_not_taken_as_everything() {
        for text in ["", " ", "\t\n  "] {
            let err = Filter::parse(text).unwrap_err();
            assert_eq!(err, FilterError::Empty, "{text:?}");
            assert!(err.to_string().contains("empty"), "{err}");
        }
    }
}
