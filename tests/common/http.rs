//! An HTTP client for tests: real `curl` against an agent's endpoint, so
//! what the tests see is what an operator's script sees.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An `http:` section on a free loopback port, and a client of it (without
/// the token: the agent makes it when it starts).
pub fn http_section() -> (String, Client) {
    let port = free_port();
    let yaml = format!("http:\n  listen: \"127.0.0.1:{port}\"\n");
    (yaml, Client::new(&format!("http://127.0.0.1:{port}")))
}

/// Two agents with an `http:` endpoint each, on `broker` (a `broker:`
/// section), in `dir/alpha` and `dir/beta`: alpha sends what `alpha_send`
/// lists (profiles under `send:`); beta receives `DATA` from alpha into
/// `dir/inbox` and runs `dir/import.sh` on success, which refuses files
/// named `bad*` (exit 1, "refused NAME"), plus the profiles of `beta_more`
/// (under `receive:`). Both are started; each client has its agent's token.
pub fn start_pair(
    dir: &Path,
    broker: &str,
    (alpha_send, beta_more): (&str, &str),
) -> (super::Agent, super::Agent, Client, Client) {
    use std::os::unix::fs::PermissionsExt;
    let hook = dir.join("import.sh");
    std::fs::write(
        &hook,
        "#!/bin/sh\ncase \"$HAKOBU_FILE_NAME\" in bad*) echo \"refused $HAKOBU_FILE_NAME\"; exit 1;; esac\necho imported\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ha, a) = http_section();
    let alpha_yaml = format!("node: alpha\nstate_dir: state\n{broker}{ha}send:\n{alpha_send}");
    let (hb, b) = http_section();
    let beta_yaml = format!(
        "node: beta\nstate_dir: state\n{broker}{hb}receive:\n  - file_id: DATA\n    from: [ alpha ]\n    inbox: {inbox}\n    on_success: [ \"{hook}\" ]\n{beta_more}",
        inbox = dir.join("inbox").display(),
        hook = hook.display(),
    );
    let mut alpha = super::Agent::new("alpha", &dir.join("alpha"), &alpha_yaml);
    let mut beta = super::Agent::new("beta", &dir.join("beta"), &beta_yaml);
    alpha.start();
    beta.start();
    let a = a.with_token_file(&dir.join("alpha/state/http.token"));
    let b = b.with_token_file(&dir.join("beta/state/http.token"));
    (alpha, beta, a, b)
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header lines as `name: value`, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): status {} {}", self.status, self.body))
    }
}

/// A client of one endpoint: `base` such as `http://127.0.0.1:9810`.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    /// Sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Sent as `Cookie:`.
    pub cookie: Option<String>,
    /// `--cacert` for https.
    pub ca: Option<PathBuf>,
    /// Extra header lines.
    pub headers: Vec<String>,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            base: base.to_string(),
            token: None,
            cookie: None,
            ca: None,
            headers: Vec::new(),
        }
    }

    /// The client with the agent's token (the file `http.token_file` names).
    pub fn with_token_file(mut self, path: &Path) -> Client {
        self.token = Some(std::fs::read_to_string(path).unwrap().trim().to_string());
        self
    }

    pub fn get(&self, path: &str) -> Answer {
        self.request("GET", path, None, None)
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Answer {
        self.request(
            "POST",
            path,
            Some(&body.to_string()),
            Some("application/json"),
        )
    }

    pub fn post_form(&self, path: &str, body: &str) -> Answer {
        self.request(
            "POST",
            path,
            Some(body),
            Some("application/x-www-form-urlencoded"),
        )
    }

    /// Runs curl; a connection that fails gives status 0 and curl's message.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        content_type: Option<&str>,
    ) -> Answer {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-i", "--max-time", "30", "-X", method]);
        if let Some(t) = &self.token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(c) = &self.cookie {
            cmd.args(["-H", &format!("Cookie: {c}")]);
        }
        if let Some(ca) = &self.ca {
            cmd.arg("--cacert").arg(ca);
        }
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        if let Some(ct) = content_type {
            cmd.args(["-H", &format!("Content-Type: {ct}")]);
        }
        if let Some(b) = body {
            cmd.args(["--data-binary", b]);
        }
        cmd.arg(format!("{}{path}", self.base));
        let out = cmd
            .output()
            .expect("curl must be installed (tests/run.sh installs it)");
        if !out.status.success() {
            return Answer {
                status: 0,
                headers: Vec::new(),
                body: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
        }
        parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Splits curl's `-i` output into the last response's status, headers, body.
fn parse(text: &str) -> Answer {
    let mut rest = text;
    loop {
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status == 100 {
            rest = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        return Answer {
            status,
            headers,
            body: body.to_string(),
        };
    }
}

/// An agent hosting the embedded broker, with `http:` on a free port.
pub struct HttpAgent {
    pub agent: super::Agent,
    pub client: Client,
    pub token_file: PathBuf,
    /// The embedded broker's address, for other agents to `connect:`.
    pub broker: String,
}

/// Starts agent `node` in `dir` hosting the embedded broker, with `http:`
/// (`http_extra`: more lines under `http:`, indented two spaces) and
/// `profiles` (the `send:` / `receive:` sections). Its client holds the token.
pub fn http_agent(dir: &Path, node: &str, http_extra: &str, profiles: &str) -> HttpAgent {
    let (bport, hport) = (free_port(), free_port());
    let broker = format!("127.0.0.1:{bport}");
    let yaml = format!(
        "node: {node}\nstate_dir: {state}\nbroker:\n  embedded:\n    listen: \"{broker}\"\nhttp:\n  listen: \"127.0.0.1:{hport}\"\n{http_extra}{profiles}",
        state = dir.join("state").display(),
    );
    let mut agent = super::Agent::new(node, dir, &yaml);
    agent.start();
    let token_file = dir.join("state/http.token");
    let scheme = if http_extra.contains("tls:") {
        "https"
    } else {
        "http"
    };
    let client = Client::new(&format!("{scheme}://127.0.0.1:{hport}")).with_token_file(&token_file);
    HttpAgent {
        agent,
        client,
        token_file,
        broker,
    }
}
