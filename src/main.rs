use std::process::ExitCode;

use clap::Parser;
use pgconverge::cli::{self, Cli, Outcome};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version are successes; every usage error is exit 1, since exit 2
            // means "changes pending" to callers of `plan --detailed-exitcode`.
            return if e.use_stderr() { ExitCode::from(1) } else { ExitCode::SUCCESS };
        }
    };
    cli::init_tracing(cli.log_format);
    match cli::run(cli, &mut std::io::stdout().lock()) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::ChangesPending) => ExitCode::from(2),
        Err(e) => {
            tracing::debug!(error = ?e, "command failed");
            eprintln!("{}", pgconverge::model::printable(&e.report()));
            ExitCode::from(1)
        }
    }
}
