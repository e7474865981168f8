//! `sagactl`: operate and reconcile sagas from the command line (see `sagactl --help`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(sagas_orchestrator::cli::main().await)
}
