//! AMQP URLs as text: the user and host they name, the password taken out of
//! anything printed, and a password from a file put in. Plain string work, so
//! that the configuration can check URLs without knowing AMQP; the RabbitMQ
//! backend (`broker/rabbitmq.rs`) uses the same functions for its logs.

/// `amqp://user:secret@host/v` → `amqp://user@host/v` (the form logs have
/// always used); any other text unchanged.
pub fn redact_url(url: &str) -> String {
    match userinfo_span(url) {
        Some((start, at)) => match url[start..at].find(':') {
            Some(colon) => format!("{}{}", &url[..start + colon], &url[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// Every `amqp://` or `amqps://` URL inside `text` with its password
/// left out: for error messages that quote what was written (a URL
/// given as a string instead of a list is echoed by the YAML parser).
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = find_scheme(rest) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | ',' | ']' | '}'))
            .unwrap_or(tail.len());
        out.push_str(&redact_url(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

fn find_scheme(text: &str) -> Option<usize> {
    let lower = text.to_ascii_lowercase();
    [lower.find("amqp://"), lower.find("amqps://")]
        .into_iter()
        .flatten()
        .min()
}

/// Byte range of the user info (`user:password`) of `url`: from after
/// `://` to the last `@` of the authority.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    // A password may hold an unencoded '@': the authority's last one counts.
    let at = url[start..authority_end].rfind('@')? + start;
    Some((start, at))
}

/// The user name in an AMQP URL (percent-decoded), which the broker checks
/// `user_id` against.
pub fn url_user(url: &str) -> Option<String> {
    let (start, at) = userinfo_span(url)?;
    let user = url[start..at].split(':').next()?;
    (!user.is_empty()).then(|| percent_decode(user))
}

/// True when the URL's user info carries a password.
pub fn has_password(url: &str) -> bool {
    userinfo_span(url).is_some_and(|(s, at)| url[s..at].contains(':'))
}

/// The host of an AMQP URL, without brackets for IPv6.
pub fn url_host(url: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..authority_end];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        hostport.split(':').next()?
    };
    Some(percent_decode(host))
}

/// True for `localhost` and loopback addresses: traffic that never leaves the host.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `amqp://user@host/v` with `password` put in (percent-encoded).
pub fn with_password(url: &str, password: &str) -> String {
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    match userinfo_span(url) {
        Some((start, at)) => {
            let user = url[start..at].split(':').next().unwrap_or("");
            format!("{}{user}:{encoded}{}", &url[..start], &url[at..])
        }
        None => url.to_string(),
    }
}

/// `%40` → `@`: user names in URLs are percent-encoded.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_and_users_found() {
        assert_eq!(
            redact_url("amqp://hakobu:secret@127.0.0.1:5672/%2f"),
            "amqp://hakobu@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://p@ss:s@cr@t@h/v"), "amqp://p@ss@h/v");
        assert_eq!(redact_url("amqp://h:5672/a@b"), "amqp://h:5672/a@b");
        assert_eq!(
            url_user("amqp://hakobu:secret@127.0.0.1:5672/%2f").as_deref(),
            Some("hakobu")
        );
        assert_eq!(url_user("amqp://127.0.0.1:5672"), None);
        assert_eq!(url_user("amqp://a%40b:x@h/").as_deref(), Some("a@b"));
        assert!(has_password("amqp://a:b@h") && !has_password("amqp://a@h"));
    }

    #[test]
    fn text_is_redacted_wherever_a_url_appears() {
        let t = r#"invalid type: string "amqp://u:topsecret@h:1/%2f", expected a sequence; AMQPS://x:y@z"#;
        let r = redact_text(t);
        assert!(!r.contains("topsecret") && !r.contains(":y@"), "{r}");
        assert!(r.contains("amqp://u@h:1/%2f"), "{r}");
    }

    #[test]
    fn hosts_and_loopback() {
        assert_eq!(
            url_host("amqp://u:p@10.0.0.1:5672/").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(url_host("amqps://[::1]:5671").as_deref(), Some("::1"));
        assert_eq!(url_host("amqp://localhost").as_deref(), Some("localhost"));
        assert!(is_loopback_host("127.0.0.2") && is_loopback_host("::1"));
        assert!(!is_loopback_host("example.com") && !is_loopback_host("10.1.1.1"));
        assert_eq!(
            with_password("amqp://alpha@h:1/%2f", "a/b c"),
            "amqp://alpha:a%2Fb%20c@h:1/%2f"
        );
    }
}
