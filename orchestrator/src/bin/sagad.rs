//! `sagad`: an orchestrator process without definitions of its own. It drives replies, timers
//! and the outbox of instances started elsewhere (TCC instances fully; saga steps whose command
//! needs the definition's code compensate). Applications embed the orchestrator with their
//! definitions through `sagas_orchestrator::server::serve`.

use sagas_orchestrator::config::Config;
use sagas_orchestrator::definition::Registry;
use sagas_orchestrator::server;

// The process allocates and frees many small buffers per message (JSON, SQL rows, AMQP
// frames); with mimalloc the benchmark spends about a tenth less CPU in this process than with
// the system allocator (docs/performance.md, round 5).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    server::init_tracing();
    server::serve(Config::from_env(), Registry::new(), None).await
}
