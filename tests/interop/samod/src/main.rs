//! A samod repo connected to a Causeway node, driven by Causeway's interop
//! tests the same way as the JavaScript client (`../js/client.mjs`):
//!
//! ```text
//! causeway-interop-samod-client WS_URL
//! ```
//!
//! dials `WS_URL` with samod's own WebSocket dialer, then answers one JSON
//! command per line on stdin with one JSON line on stdout:
//!
//! ```text
//! {"cmd":"create","value":{...}}        -> {"id","heads"}   (scalar values)
//! {"cmd":"find","id":ID}                -> {"heads","value","ms"} or {"unavailable":true,"ms"}
//! {"cmd":"change","id":ID,"set":{...}}  -> {"heads"}
//! {"cmd":"wait","id":ID,"heads":[...],"timeout_ms":N} -> {"heads","value","ok"}
//! {"cmd":"quit"}
//! ```
//!
//! Every samod setting is its default.

use std::collections::HashMap;
use std::error::Error;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoSerde, Automerge, ScalarValue, ROOT};
use samod::{BackoffConfig, DocHandle, DocumentId, Repo, Url};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

fn heads(doc: &Automerge) -> Vec<String> {
    doc.get_heads().iter().map(ToString::to_string).collect()
}

fn state(handle: &DocHandle) -> Result<Value> {
    handle.with_document(|d| {
        Ok(json!({"heads": heads(d), "value": serde_json::to_value(AutoSerde::from(&*d))?}))
    })
}

fn scalar(v: &Value) -> Result<ScalarValue> {
    Ok(match v {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::Number(n) if n.is_i64() => ScalarValue::Int(n.as_i64().unwrap_or_default()),
        Value::Number(n) => ScalarValue::F64(n.as_f64().unwrap_or_default()),
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        other => return Err(format!("only scalar values: {other}").into()),
    })
}

fn assign(doc: &mut Automerge, set: &Value) -> Result<()> {
    let map = set.as_object().ok_or("set must be an object")?;
    let mut tx = doc.transaction();
    for (k, v) in map {
        tx.put(ROOT, k, scalar(v)?)?;
    }
    tx.commit();
    Ok(())
}

struct Client {
    repo: Repo,
    handles: HashMap<String, DocHandle>,
}

impl Client {
    async fn handle(&mut self, id: &str) -> Result<DocHandle> {
        if let Some(h) = self.handles.get(id) {
            return Ok(h.clone());
        }
        let found = self
            .repo
            .find(id.parse::<DocumentId>()?)
            .await?
            .ok_or("unavailable")?;
        self.handles.insert(id.to_string(), found.clone());
        Ok(found)
    }

    async fn run(&mut self, cmd: &Value) -> Result<Value> {
        let id = cmd["id"].as_str().unwrap_or_default();
        match cmd["cmd"].as_str().unwrap_or_default() {
            "create" => {
                let mut doc = Automerge::new();
                assign(&mut doc, &cmd["value"])?;
                let handle = self.repo.create(doc).await?;
                let id = handle.document_id().to_string();
                let heads = handle.with_document(|d| heads(d));
                self.handles.insert(id.clone(), handle);
                Ok(json!({"id": id, "heads": heads}))
            }
            "find" => {
                let started = Instant::now();
                let found = self.repo.find(id.parse::<DocumentId>()?).await?;
                let ms = started.elapsed().as_secs_f64() * 1e3;
                match found {
                    Some(handle) => {
                        self.handles.insert(id.to_string(), handle.clone());
                        let mut answer = state(&handle)?;
                        answer["ms"] = json!(ms);
                        Ok(answer)
                    }
                    None => Ok(json!({"unavailable": true, "ms": ms})),
                }
            }
            "change" => {
                let handle = self.handle(id).await?;
                handle.with_document(|d| assign(d, &cmd["set"]))?;
                Ok(json!({"heads": handle.with_document(|d| heads(d))}))
            }
            "wait" => {
                let handle = self.handle(id).await?;
                let mut want: Vec<String> = cmd["heads"]
                    .as_array()
                    .ok_or("heads")?
                    .iter()
                    .filter_map(|h| h.as_str().map(String::from))
                    .collect();
                want.sort();
                let timeout = Duration::from_millis(cmd["timeout_ms"].as_u64().unwrap_or(10_000));
                let started = Instant::now();
                loop {
                    let mut have = handle.with_document(|d| heads(d));
                    have.sort();
                    if have == want || started.elapsed() > timeout {
                        let mut answer = state(&handle)?;
                        answer["ok"] = json!(have == want);
                        return Ok(answer);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            "quit" => {
                self.repo.clone().stop().await;
                std::process::exit(0);
            }
            other => Err(format!("unknown command {other}").into()),
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let url = std::env::args().nth(1).ok_or("usage: causeway-interop-samod-client WS_URL")?;
    let repo = Repo::build_tokio().load().await;
    let dialer = repo.dial_websocket(Url::parse(&url)?, BackoffConfig::default())?;
    dialer
        .established()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let mut client = Client {
        repo,
        handles: HashMap::new(),
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(cmd) => client
                .run(&cmd)
                .await
                .unwrap_or_else(|e| json!({"error": e.to_string()})),
            Err(e) => json!({"error": e.to_string()}),
        };
        println!("{answer}");
    }
    Ok(())
}
