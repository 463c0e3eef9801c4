//! `lora-train dashboard`: the jobs, their runs' curves, sweeps, workflows and compare
//! results in a browser (see `dashboard/mod.rs`).
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::dashboard::{self, Dashboard};
use crate::serve::HttpServer;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on (loopback by default: nothing outside this machine can connect;
    /// any other address needs --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port; the address is printed on stderr).
    #[arg(long, default_value_t = 8050)]
    pub port: u16,
    /// Require this key: open the page as http://HOST:PORT/?key=KEY (or send
    /// `Authorization: Bearer KEY`).
    #[arg(long, env = "LORA_TRAIN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Also show this run, sweep, workflow or compare directory (repeat for several).
    #[arg(long = "dir", value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
}

/// `localhost` or a loopback address.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

pub fn run(args: Args) -> Result<()> {
    if !is_loopback(&args.host) && args.api_key.is_none() {
        bail!("--host {}: the dashboard shows every job's command line and files; listening beyond this machine needs --api-key KEY", args.host);
    }
    for dir in &args.dirs {
        if !dir.is_dir() {
            bail!("--dir {}: not a directory", dir.display());
        }
    }
    let store = crate::jobs::store::home()?.join(crate::jobs::store::DB_FILE);
    let dash = Arc::new(Dashboard { store, dirs: args.dirs, api_key: args.api_key });
    let server = HttpServer::start_router(dashboard::router(dash), &args.host, args.port, true)?;
    // Tests and scripts read the address (with --port 0) from this line.
    eprintln!("lora-train dashboard: listening on http://{}", server.addr);
    server.wait();
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_hosts() {
        for h in ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"] {
            assert!(super::is_loopback(h), "{h}");
        }
        for h in ["0.0.0.0", "192.168.1.2", "::", "example.com"] {
            assert!(!super::is_loopback(h), "{h}");
        }
    }
}
