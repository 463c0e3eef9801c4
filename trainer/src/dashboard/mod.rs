//! `lora-train dashboard`: a local web page over the job store and the run directories.
//!
//! The server only reads: the job store (opened read-only per request) and the
//! directories of its jobs' `--output` (plus any `--dir` given), through [`views`]. The
//! page (`assets/`, embedded in the binary) is one script that polls the JSON routes and
//! draws its charts as SVG, so curves grow while a run trains without a reload.
//!
//! Routes: `/` (jobs), `/view/ROOT[/SUB]` (a directory's page), `/api/jobs`,
//! `/api/view/ROOT[/SUB]`, `/files/ROOT/SUB` (a report's SVG), `/assets/NAME`. ROOT is
//! `job-ID` or `dir-N` (the N-th `--dir`); SUB a path inside it.
pub mod views;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::jobs::store::{Job, JobStatus, Store};
use views::Refused;

/// What the server reads.
pub struct Dashboard {
    /// The job store's file (it may not exist yet: no job has run).
    pub store: PathBuf,
    /// Directories to show besides the jobs' (`--dir`).
    pub dirs: Vec<PathBuf>,
    /// `--api-key`: required on every request (header, cookie, or `?key=` once).
    pub api_key: Option<String>,
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
/// The cookie the page's later requests carry after `?key=` opened it.
const KEY_COOKIE: &str = "lora_train_dashboard_key";

type St = State<Arc<Dashboard>>;

pub fn router(dash: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/view/{root}", get(view_page))
        .route("/view/{root}/{*sub}", get(view_page_sub))
        .route("/api/jobs", get(jobs))
        .route("/api/view/{root}", get(view_api))
        .route("/api/view/{root}/{*sub}", get(view_api_sub))
        .route("/files/{root}/{*sub}", get(file))
        .route("/assets/{name}", get(asset))
        .fallback(|req: Request| async move { error_page(StatusCode::NOT_FOUND, &format!("no page {}", req.uri().path())) })
        .layer(middleware::from_fn_with_state(dash.clone(), check_key))
        .with_state(dash)
}

/// `--api-key`: the key as `Authorization: Bearer KEY`, as the cookie, or as `?key=KEY`
/// (a browser's first visit; the answer then sets the cookie so the page's own requests
/// carry it).
async fn check_key(State(d): St, req: Request, next: Next) -> Response {
    let Some(key) = d.api_key.as_deref() else { return next.run(req).await };
    let headers = req.headers();
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(KEY_COOKIE)?.strip_prefix('='))
        .any(|v| v == key);
    let query = req.uri().query().unwrap_or_default().split('&').any(|kv| kv.strip_prefix("key=") == Some(key));
    if bearer == Some(key) || cookie {
        return next.run(req).await;
    }
    if query {
        let mut resp = next.run(req).await;
        if let Ok(v) = HeaderValue::from_str(&format!("{KEY_COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/")) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
        return resp;
    }
    error_page(StatusCode::UNAUTHORIZED, "this dashboard needs its API key: open it as /?key=KEY (or send Authorization: Bearer KEY)")
}

fn error_page(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{code} - lora-train dashboard</title><link rel=\"stylesheet\" href=\"/assets/style.css\"></head>\
         <body><main><h1 id=\"error\">{code}</h1><p class=\"error\">{msg}</p><p><a href=\"/\">All jobs</a></p></main></body></html>",
        code = status.as_u16(),
        msg = escape_html(message)
    );
    (status, Html(body)).into_response()
}

fn api_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

async fn page() -> Html<&'static str> {
    Html(INDEX_HTML)
}

async fn asset(UrlPath(name): UrlPath<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return error_page(StatusCode::NOT_FOUND, &format!("no asset `{name}`")),
    };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Store reads run on the blocking pool (SQLite waits on a busy lock).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a dashboard read panicked")
}

/// Every job, newest first, with `alive` (a running local job's process is still there).
/// No store yet is an empty list.
fn list_jobs(d: &Dashboard) -> anyhow::Result<Vec<Value>> {
    if !d.store.exists() {
        return Ok(Vec::new());
    }
    let store = Store::open_read_only(&d.store)?;
    let here = crate::jobs::process::hostname();
    Ok(store
        .list()?
        .into_iter()
        .map(|job| {
            let alive = match (job.status, job.pid) {
                (JobStatus::Running, Some(pid)) if job.backend == "local" && job.host.as_deref() == Some(here.as_str()) => {
                    Some(crate::jobs::process::is_alive(pid, job.pid_start))
                }
                _ => None,
            };
            let mut v = serde_json::to_value(&job).unwrap_or_default();
            v["alive"] = json!(alive);
            v["root"] = json!(format!("job-{}", job.id));
            v
        })
        .collect())
}

async fn jobs(State(d): St) -> Response {
    let dirs: Vec<Value> = d.dirs.iter().enumerate().map(|(i, p)| json!({"root": format!("dir-{i}"), "path": p.display().to_string()})).collect();
    match blocking(move || list_jobs(&d)).await.map(|jobs| (jobs, dirs)) {
        Ok((jobs, dirs)) => Json(json!({"jobs": jobs, "dirs": dirs})).into_response(),
        Err(e) => api_error(StatusCode::SERVICE_UNAVAILABLE, &format!("cannot read the job store: {e:#}")),
    }
}

/// The directory a root names: a job's `--output` (relative to the job's working
/// directory), or a `--dir`.
fn root_dir(d: &Dashboard, root: &str) -> Result<(PathBuf, Option<Job>), Refused> {
    if let Some(n) = root.strip_prefix("dir-") {
        let dir = n.parse::<usize>().ok().and_then(|n| d.dirs.get(n)).ok_or_else(|| Refused::Missing(format!("no directory `{root}`")))?;
        return Ok((dir.clone(), None));
    }
    let Some(id) = root.strip_prefix("job-").and_then(|n| n.parse::<i64>().ok()) else {
        return Err(Refused::BadPath(format!("`{root}` names neither a job (job-ID) nor a directory (dir-N)")));
    };
    let job = (d.store.exists())
        .then(|| Store::open_read_only(&d.store).and_then(|s| s.get(id)))
        .transpose()
        .map_err(|e| Refused::Missing(format!("cannot read the job store: {e:#}")))?
        .flatten()
        .ok_or_else(|| Refused::Missing(format!("no job {id}")))?;
    let Some(out) = &job.output else { return Err(Refused::Missing(format!("job {id} has no output directory"))) };
    let dir = if out.is_relative() { job.cwd.join(out) } else { out.clone() };
    Ok((dir, Some(job)))
}

fn lookup(d: &Dashboard, root: &str, sub: &str) -> Result<(PathBuf, Option<Job>), Refused> {
    let (dir, job) = root_dir(d, root)?;
    Ok((views::resolve(&dir, sub)?, job))
}

fn refused(r: Refused, api: bool) -> Response {
    let (status, msg) = match r {
        Refused::BadPath(m) => (StatusCode::BAD_REQUEST, m),
        Refused::Missing(m) => (StatusCode::NOT_FOUND, m),
    };
    if api { api_error(status, &msg) } else { error_page(status, &msg) }
}

async fn view_page(state: St, UrlPath(root): UrlPath<String>) -> Response {
    view_page_sub(state, UrlPath((root, String::new()))).await
}

/// The page shell for a directory that exists (its script fetches the view), else 4xx.
async fn view_page_sub(State(d): St, UrlPath((root, sub)): UrlPath<(String, String)>) -> Response {
    match blocking(move || lookup(&d, &root, &sub)).await {
        Ok((dir, _)) if dir.is_dir() => Html(INDEX_HTML).into_response(),
        Ok(_) => error_page(StatusCode::NOT_FOUND, "not a directory"),
        Err(r) => refused(r, false),
    }
}

/// `?since=STEP` of `/api/view/...`.
#[derive(serde::Deserialize)]
struct ViewQuery {
    since: Option<u64>,
}

async fn view_api(state: St, UrlPath(root): UrlPath<String>, query: Query<ViewQuery>) -> Response {
    view_api_sub(state, UrlPath((root, String::new())), query).await
}

async fn view_api_sub(State(d): St, UrlPath((root, sub)): UrlPath<(String, String)>, Query(q): Query<ViewQuery>) -> Response {
    let result = blocking(move || {
        let (dir, job) = lookup(&d, &root, &sub)?;
        if !dir.is_dir() {
            return Err(Refused::Missing(format!("`{sub}` is not a directory")));
        }
        let mut v = views::view(&dir, &sub, q.since);
        v["root"] = json!(root);
        v["dir"] = json!(dir.display().to_string());
        v["job"] = serde_json::to_value(&job).unwrap_or_default();
        Ok(v)
    })
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(r) => refused(r, true),
    }
}

/// An SVG a report drew (curves, confusion heat maps), as an image.
async fn file(State(d): St, UrlPath((root, sub)): UrlPath<(String, String)>) -> Response {
    if !sub.ends_with(".svg") {
        return error_page(StatusCode::BAD_REQUEST, "only a report's .svg files are served");
    }
    match blocking(move || lookup(&d, &root, &sub).and_then(|(p, _)| std::fs::read(&p).map_err(|e| Refused::Missing(format!("{e}"))))).await {
        // The sandbox keeps a script inside an SVG from running if it is opened directly.
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/svg+xml"), (header::CONTENT_SECURITY_POLICY, "sandbox")], bytes).into_response(),
        Err(r) => refused(r, false),
    }
}
