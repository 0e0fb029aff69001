//! `cargo run -p async-layer`: serves [`async_layer::app`] (see its
//! documentation for the curl calls). `LISTEN` sets the address (default
//! `127.0.0.1:3000`; port 0 picks a free one, printed at start-up).

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let addr = listener.local_addr()?;
    println!(
        "listening on http://{addr} (POST /reports with an Idempotency-Key header: 202, then \
         GET the Location; GET /count)"
    );
    let app = async_layer::app();
    // `app.dispatcher` lives until the server stops.
    axum::serve(listener, app.router).await
}
