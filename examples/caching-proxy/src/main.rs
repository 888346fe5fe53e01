//! Run with: `cargo run -p caching-proxy -- --upstream http://127.0.0.1:8000 --listen 127.0.0.1:8080`
//! (set `REDIS_URL=redis://127.0.0.1:6379` to share the cache between
//! instances; without it the cache is in process).
//!
//! Then `curl -i http://127.0.0.1:8080/` twice: `x-cache: MISS`, then `HIT`.

use caching_proxy::{Upstream, cache, serve};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut upstream = String::from("http://127.0.0.1:8000");
    let mut listen = String::from("127.0.0.1:8080");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--upstream" => upstream = args.next().ok_or("--upstream needs a URL")?,
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    let upstream = Upstream::new(&upstream.parse()?)?;
    let redis_url = std::env::var("REDIS_URL").ok();
    let cache = cache(redis_url.as_deref()).await?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(
        %listen,
        redis = redis_url.is_some(),
        "caching proxy listening"
    );
    serve(listener, upstream, cache).await
}
