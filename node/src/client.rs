//! `causeway doc …` and `causeway status`: a small client of a node's HTTP
//! API. Prints JSON on stdout; errors carry the node's error code.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use reqwest::{Client, Method, RequestBuilder, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;

/// Where the node is and how to authenticate.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The node's HTTP API.
    #[arg(
        long,
        env = "CAUSEWAY_URL",
        default_value = "http://127.0.0.1:7780",
        global = true
    )]
    pub url: String,
    /// Bearer token, if the node requires one.
    #[arg(long, env = "CAUSEWAY_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// PEM certificates to trust for an https:// URL (a node's self-signed
    /// certificate or its CA). Default: the system's CA bundle.
    #[arg(long, env = "CAUSEWAY_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

impl Target {
    /// An HTTP client for this target.
    pub fn client(&self) -> Result<Client> {
        http_client(self.ca_cert.as_deref())
    }
}

/// The system's CA bundle (Debian and its derivatives; `SSL_CERT_FILE`
/// names another).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Makes aws-lc-rs (the provider libp2p already builds) the process's
/// default rustls crypto provider, unless one is installed. A reqwest
/// client built without [`http_client`]'s preconfigured TLS needs one: the
/// `causeway` binary calls this first thing.
pub fn install_crypto_provider() {
    // Err: the process installed one already, which then stays.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An HTTP client that speaks https:// with rustls, trusting the PEM
/// certificates in `ca` (else the system's CA bundle, if there is one).
pub fn http_client(ca: Option<&Path>) -> Result<Client> {
    let bundle = match ca {
        Some(path) => Some(path.to_path_buf()),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from(SYSTEM_CA_BUNDLE)).filter(|p| p.exists())),
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &bundle {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("cannot read certificates from {}", path.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 && ca.is_some() {
            bail!("{} holds no certificate to trust", path.display());
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Client::builder().use_preconfigured_tls(tls).build()?)
}

/// `causeway doc` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DocCommand {
    /// Print a document as JSON (its heads go to stderr).
    Get {
        /// Document id.
        id: String,
        /// Session token from an earlier write or read: answer only once the
        /// node holds what it covers.
        #[arg(long)]
        session: Option<String>,
        /// How long the node may wait for the session token, milliseconds.
        #[arg(long)]
        wait_ms: Option<u64>,
        /// If the wait runs out, print the node's current data anyway.
        #[arg(long)]
        stale: bool,
    },
    /// Replace a document with a JSON object (argument, or stdin if "-").
    Put {
        /// Document id.
        id: String,
        /// The JSON object, or "-" to read it from stdin.
        json: String,
        /// Session and durability options.
        #[command(flatten)]
        opts: WriteOpts,
    },
    /// Apply a JSON merge patch (RFC 7386) to a document.
    Patch {
        /// Document id.
        id: String,
        /// The patch, or "-" to read it from stdin.
        json: String,
        /// Session and durability options.
        #[command(flatten)]
        opts: WriteOpts,
    },
    /// Delete a document.
    Delete {
        /// Document id.
        id: String,
        /// Session and durability options.
        #[command(flatten)]
        opts: WriteOpts,
    },
    /// Which regions and peers are known to hold a document at the heads of
    /// a session token (default: the node's current heads), and since when.
    Where {
        /// Document id.
        id: String,
        /// Session token whose heads to look for.
        #[arg(long)]
        session: Option<String>,
    },
    /// List document ids under a prefix, following pages.
    List {
        /// Only ids starting with this.
        #[arg(default_value = "")]
        prefix: String,
        /// Stop after this many ids.
        #[arg(long)]
        max: Option<usize>,
    },
    /// Repair a quarantined document (its stored data is corrupt; see
    /// `causeway status`): discard the local copy, which anti-entropy then
    /// fetches again from the peers that hold it. Refused for a document
    /// whose data reads.
    Repair {
        /// Document id.
        id: String,
    },
    /// Print each change to a document (or, with --prefix, to every document
    /// under a prefix) as one JSON line, until interrupted.
    Watch {
        /// Document id (omit with --prefix).
        id: Option<String>,
        /// Watch a prefix instead of one document.
        #[arg(long)]
        prefix: Option<String>,
    },
}

/// Consistency options of a write.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct WriteOpts {
    /// Session token to carry forward into the answer's token.
    #[arg(long)]
    pub session: Option<String>,
    /// Answer once at least this many other regions hold the write.
    #[arg(long, conflicts_with = "regions")]
    pub min_regions: Option<usize>,
    /// Answer once these regions (comma-separated) hold the write.
    #[arg(long)]
    pub regions: Option<String>,
    /// How long to wait for the regions, milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
}

impl WriteOpts {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = &self.session {
            q.push(("session", s.clone()));
        }
        if let Some(k) = self.min_regions {
            q.push(("min_regions", k.to_string()));
        }
        if let Some(r) = &self.regions {
            q.push(("regions", r.clone()));
        }
        if let Some(t) = self.timeout_ms {
            q.push(("timeout_ms", t.to_string()));
        }
        q
    }
}

impl Target {
    fn request(&self, client: &Client, method: Method, path: &str) -> RequestBuilder {
        let builder = client.request(method, format!("{}{path}", self.url.trim_end_matches('/')));
        match &self.token {
            Some(t) => builder.bearer_auth(t),
            None => builder,
        }
    }
}

/// Runs a `causeway doc` subcommand.
pub async fn doc(target: &Target, command: DocCommand) -> Result<()> {
    let client = target.client()?;
    let path = |id: &str| format!("/v1/docs/{id}");
    match command {
        DocCommand::Get {
            id,
            session,
            wait_ms,
            stale,
        } => {
            let mut query = vec![("stale", stale.to_string())];
            if let Some(s) = session {
                query.push(("session", s));
            }
            if let Some(w) = wait_ms {
                query.push(("wait_ms", w.to_string()));
            }
            let req = target
                .request(&client, Method::GET, &path(&id))
                .query(&query);
            let resp = checked(req.send().await).await?;
            for (header, label) in [
                ("causeway-heads", "heads"),
                ("causeway-session", "session"),
                ("causeway-stale", "stale"),
            ] {
                if let Some(h) = resp.headers().get(header) {
                    eprintln!("{label}: {}", h.to_str().unwrap_or_default());
                }
            }
            print_json(&resp.json::<Value>().await?)
        }
        DocCommand::Put { id, json, opts } => {
            write(target, &client, Method::PUT, &path(&id), Some(&json), &opts).await
        }
        DocCommand::Patch { id, json, opts } => {
            write(
                target,
                &client,
                Method::PATCH,
                &path(&id),
                Some(&json),
                &opts,
            )
            .await
        }
        DocCommand::Delete { id, opts } => {
            write(target, &client, Method::DELETE, &path(&id), None, &opts).await
        }
        DocCommand::Where { id, session } => {
            let mut req = target.request(&client, Method::GET, &format!("/v1/where/{id}"));
            if let Some(s) = session {
                req = req.query(&[("session", s)]);
            }
            print_json(&checked(req.send().await).await?.json::<Value>().await?)
        }
        DocCommand::List { prefix, max } => list(target, &client, &prefix, max).await,
        DocCommand::Repair { id } => {
            let req = target.request(&client, Method::POST, &format!("/v1/repair/{id}"));
            print_json(&checked(req.send().await).await?.json::<Value>().await?)
        }
        DocCommand::Watch { id, prefix } => watch(target, &client, id, prefix).await,
    }
}

/// Runs `causeway status`.
pub async fn status(target: &Target) -> Result<()> {
    let client = target.client()?;
    let resp = checked(
        target
            .request(&client, Method::GET, "/v1/status")
            .send()
            .await,
    )
    .await?;
    print_json(&resp.json::<Value>().await?)
}

/// `causeway node drain`: asks the node to drain and waits for its answer,
/// which comes once a peer holds everything it held (then it exits), and
/// prints the drain's status.
pub async fn drain(target: &Target) -> Result<()> {
    let client = target.client()?;
    eprintln!("draining: the node takes no new writes and hands what it holds to a peer");
    let started = std::time::Instant::now();
    let resp = checked(
        target
            .request(&client, Method::POST, "/v1/drain")
            .send()
            .await,
    )
    .await?;
    let done = resp.status() == reqwest::StatusCode::OK;
    let answer: Value = resp.json().await?;
    if !done {
        bail!(
            "not drained yet (the drain goes on; run this again to wait): {}",
            answer["drain"]
        );
    }
    eprintln!(
        "drained in {:.1} s: a peer holds everything the node held; it stops",
        started.elapsed().as_secs_f64()
    );
    print_json(&answer["drain"])
}

async fn write(
    target: &Target,
    client: &Client,
    method: Method,
    path: &str,
    json: Option<&str>,
    opts: &WriteOpts,
) -> Result<()> {
    let mut req = target.request(client, method, path).query(&opts.query());
    if let Some(json) = json {
        let body = if json == "-" {
            std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
        } else {
            json.to_string()
        };
        req = req.header("content-type", "application/json").body(body);
    }
    let resp = checked(req.send().await).await?;
    if resp.status() == reqwest::StatusCode::ACCEPTED {
        eprintln!("durable here; the regions asked for do not all hold it yet (see durability)");
    }
    print_json(&resp.json::<Value>().await?)
}

async fn list(target: &Target, client: &Client, prefix: &str, max: Option<usize>) -> Result<()> {
    let mut after: Option<String> = None;
    let mut printed = 0;
    loop {
        let mut query = vec![
            ("prefix", prefix.to_string()),
            ("limit", "1000".to_string()),
        ];
        if let Some(a) = &after {
            query.push(("after", a.clone()));
        }
        let req = target
            .request(client, Method::GET, "/v1/docs")
            .query(&query);
        let page: Value = checked(req.send().await).await?.json().await?;
        for id in page["ids"].as_array().into_iter().flatten() {
            if max.is_some_and(|m| printed >= m) {
                return Ok(());
            }
            println!("{}", id.as_str().unwrap_or_default());
            printed += 1;
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(()),
        }
    }
}

async fn watch(
    target: &Target,
    client: &Client,
    id: Option<String>,
    prefix: Option<String>,
) -> Result<()> {
    let req = match (id, prefix) {
        (Some(id), None) => target.request(client, Method::GET, &format!("/v1/watch/{id}")),
        (None, Some(p)) => target
            .request(client, Method::GET, "/v1/watch")
            .query(&[("prefix", p)]),
        _ => bail!("give either a document id or --prefix"),
    };
    let resp = checked(req.send().await).await?;
    let mut stream = resp.bytes_stream();
    let mut buffer = String::new();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            for line in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                println!("{}", line.trim_start());
                std::io::stdout().flush()?;
            }
        }
    }
    Ok(())
}

/// The response if it succeeded; otherwise the node's error code and message.
pub(crate) async fn checked(resp: reqwest::Result<Response>) -> Result<Response> {
    let resp = resp.context("cannot reach the node (is `causeway node` running? see --url)")?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or("unknown");
    let message = body["error"]["message"].as_str().unwrap_or("");
    let mut detail = body["error"].clone();
    if let Some(obj) = detail.as_object_mut() {
        obj.remove("code");
        obj.remove("message");
        if !obj.is_empty() {
            bail!("{status}: {code}: {message}\n{detail}");
        }
    }
    bail!("{status}: {code}: {message}")
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
