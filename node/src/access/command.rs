//! `causeway token create|list|revoke`: edits a node's tokens file (see
//! [`super::token_file`]). A running node applies the change within
//! [`super::RELOAD_POLL`]; copy the file to every node a client may use.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::grant::Grant;
use super::token_file::{self, NewToken, TokenFile, TOKENS_FILE};
use super::unix_now;

/// Which tokens file a command edits.
#[derive(clap::Args, Debug, Clone)]
pub struct FileArgs {
    /// The node's data directory (the file is DATA_DIR/tokens.toml).
    #[arg(long, env = "CAUSEWAY_DATA_DIR", required_unless_present = "file")]
    pub data_dir: Option<PathBuf>,
    /// The tokens file, if the node's settings name another
    /// (`http.tokens_file`).
    #[arg(long)]
    pub file: Option<PathBuf>,
}

impl FileArgs {
    fn path(&self) -> Result<PathBuf> {
        match (&self.file, &self.data_dir) {
            (Some(file), _) => Ok(file.clone()),
            (None, Some(dir)) => Ok(dir.join(TOKENS_FILE)),
            (None, None) => bail!("give --data-dir or --file"),
        }
    }
}

/// `causeway token ...`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum TokenCommand {
    /// Issue a token: prints it on stdout (the only time it is shown; the
    /// file keeps a hash) and its id on stderr. Once a node has a tokens
    /// file, every request to it needs a token.
    Create {
        /// The tokens file.
        #[command(flatten)]
        file: FileArgs,
        /// What it may do: LEVEL:PREFIX with LEVEL read, write or admin
        /// (each includes the ones before it) on documents whose id starts
        /// with PREFIX; `*` is every document. Repeat for several. The
        /// node's own routes (backup, drain, peer blocking, audit) need
        /// admin:*.
        #[arg(long = "grant", required = true, value_name = "LEVEL:PREFIX")]
        grants: Vec<String>,
        /// What the token is for (shown by `list`).
        #[arg(long, default_value = "")]
        name: String,
        /// How long it works: such as 3600s, 90m, 12h or 30d. Default:
        /// until revoked.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
    },
    /// List the tokens of the file: id, state, expiry, grants and name.
    List {
        /// The tokens file.
        #[command(flatten)]
        file: FileArgs,
    },
    /// Revoke a token by id: nodes refuse it from their next look at the
    /// file (within a second), including on watch streams and WebSockets
    /// it holds open.
    Revoke {
        /// The tokens file.
        #[command(flatten)]
        file: FileArgs,
        /// The token's id (16 hex characters, from `create` or `list`).
        id: String,
    },
}

/// Runs a token command.
pub fn run(command: &TokenCommand) -> Result<()> {
    let now = unix_now();
    match command {
        TokenCommand::Create {
            file,
            grants,
            name,
            expires_in,
        } => {
            let grants = grants
                .iter()
                .map(|g| g.parse::<Grant>())
                .collect::<Result<Vec<_>, _>>()?;
            let expires_at = expires_in
                .as_deref()
                .map(|d| parse_duration(d).map(|secs| now.saturating_add(secs)))
                .transpose()?;
            let path = file.path()?;
            let token = token_file::create(
                &path,
                NewToken {
                    name: name.clone(),
                    grants: grants.clone(),
                    expires_at,
                },
                now,
            )?;
            let grants: Vec<String> = grants.iter().map(Grant::to_string).collect();
            eprintln!(
                "created token {} ({}) in {}",
                token.id(),
                grants.join(", "),
                path.display()
            );
            println!("{}", token.reveal());
        }
        TokenCommand::List { file } => {
            let path = file.path()?;
            let (tokens, _) = TokenFile::load(&path)
                .with_context(|| format!("cannot list the tokens of {}", path.display()))?;
            println!(
                "{:<16}  {:<7}  {:<9}  {:<30}  NAME",
                "ID", "STATE", "EXPIRES", "GRANTS"
            );
            for t in &tokens.tokens {
                let expires = match t.expires_at {
                    None => "never".to_string(),
                    Some(e) if e > now => format!("in {}", span(e - now)),
                    Some(e) => format!("{} ago", span(now - e)),
                };
                println!(
                    "{:<16}  {:<7}  {:<9}  {:<30}  {}",
                    t.id,
                    t.state(now),
                    expires,
                    t.grants.join(","),
                    t.name
                );
            }
        }
        TokenCommand::Revoke { file, id } => {
            let record = token_file::revoke(&file.path()?, id, now)?;
            eprintln!("revoked token {} ({})", record.id, record.grants.join(", "));
        }
    }
    Ok(())
}

/// `secs` in its largest whole unit: `3d`, `5h`, `12m`, `40s`.
fn span(secs: u64) -> String {
    match secs {
        86_400.. => format!("{}d", secs / 86_400),
        3600.. => format!("{}h", secs / 3600),
        60.. => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

/// Seconds in `3600s`, `90m`, `12h` or `30d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("{text:?} is not a duration such as 90m, 12h or 30d"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?}: the unit must be s, m, h or d"),
    };
    match n.checked_mul(unit) {
        Some(secs) if secs > 0 => Ok(secs),
        _ => bail!("{text:?}: a duration must be above zero and below 2^64 seconds"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration("90").ok(), Some(90));
        assert_eq!(parse_duration("90m").ok(), Some(5400));
        assert_eq!(parse_duration("30d").ok(), Some(2_592_000));
        for bad in ["", "0h", "h", "5w", "1.5h", "-3s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
