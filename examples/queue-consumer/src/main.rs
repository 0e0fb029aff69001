//! Runs the queue consumer (see the library docs) until Ctrl-C.
//!
//! ```text
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run -p queue-consumer
//! ```
//!
//! It consumes the queue `orders` (`QUEUE`), dead-letters to
//! `orders.dead`, and keeps its tables and idem's in the schema `shop`
//! (`SCHEMA`).

use idem::store::postgres::PostgresStore;
use lapin::{Connection, ConnectionProperties};
use queue_consumer::{consume, declare, Settings, Shop, Stats};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt().init();
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let amqp = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let database = env(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let settings = Settings {
        queue: env("QUEUE", "orders"),
        prefetch: 32,
        max_attempts: 5,
    };
    let store = PostgresStore::builder(database)
        .schema(env("SCHEMA", "shop"))
        .connect()
        .await?;
    let shop = Shop::open(store).await?;
    let connection = Connection::connect(&amqp, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    declare(&channel, &settings.queue).await?;
    let stats = Stats::default();
    tracing::info!(queue = %settings.queue, "consuming; Ctrl-C stops");
    tokio::select! {
        r = consume(&channel, "queue-consumer", &settings, &shop, &stats) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(?stats, "stopped");
    Ok(())
}
