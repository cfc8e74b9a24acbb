//! The CNI plugin binary: environment and stdin in, result or error JSON out. Stdout holds
//! nothing else; diagnostics go to stderr through the logger (warn and up unless
//! `RUST_LOG` says otherwise), where runtimes keep a plugin's stderr.
use std::io::{Read, Write};
use std::process::ExitCode;

use mycni::cni::{CniError, ErrorCode, NetConf};

fn main() -> ExitCode {
    mycni::logging::init(log::LevelFilter::Warn, log::LevelFilter::Off);
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = CniError::new(ErrorCode::IoFailure, "cannot read stdin").with_details(e);
        return report_error(&err, NetConf::sniff_version(&[]));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let err = CniError::new(ErrorCode::IoFailure, "cannot start runtime").with_details(e);
            return report_error(&err, NetConf::sniff_version(&stdin));
        }
    };
    let outcome = runtime.block_on(mycni::plugin::execute(
        |name| std::env::var(name).ok(),
        &stdin,
    ));
    match outcome {
        Ok(Some(output)) => {
            let mut out = std::io::stdout().lock();
            let written = serde_json::to_writer(&mut out, &output).is_ok() && writeln!(out).is_ok();
            if written {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(None) => ExitCode::SUCCESS,
        Err((err, version)) => report_error(&err, version),
    }
}

fn report_error(err: &CniError, version: mycni::cni::CniVersion) -> ExitCode {
    log::warn!("error {}: {err}", err.code.code());
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, &err.to_json(version));
    let _ = writeln!(out);
    ExitCode::FAILURE
}
