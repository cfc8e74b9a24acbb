//! The node agent's command line: parses the arguments ([`mycni::agent_cli`]) and calls the
//! library.
use clap::Parser;
use mycni::agent_cli::{AgentCli, AgentCommand};
use mycni::{daemon, datapath, map_tables, plugin_install};

fn main() -> anyhow::Result<()> {
    let cli = AgentCli::parse();
    mycni::logging::init(log::LevelFilter::Info, cli.bpf_log_filter());
    let root = cli.bpffs_root.as_path();
    match cli.command {
        AgentCommand::Run(options) => daemon::run(root, *options)?,
        AgentCommand::Load => {
            datapath::load_and_pin(root)?;
            println!("datapath pinned under {}", root.display());
        }
        AgentCommand::Unload => datapath::unpin_all(root)?,
        AgentCommand::InstallCniPlugin { dir } => {
            let installed = plugin_install::install_cni_plugin(&dir)?;
            println!("installed {}", installed.display());
        }
        AgentCommand::Endpoints(format) => map_tables::print_endpoints(root, format.json)?,
        AgentCommand::Routes(format) => map_tables::print_routes(root, format.json)?,
        AgentCommand::Peers(format) => map_tables::print_peers(root, format.json)?,
        AgentCommand::Nat(format) => map_tables::print_nat(root, format.json)?,
        AgentCommand::Stats(format) => map_tables::print_stats(root, format.json)?,
        AgentCommand::Services(format) => map_tables::print_services(root, format.json)?,
        AgentCommand::Policy(args) => {
            mycni::policy_client::print_policy(root, &args.metrics_address, args.json)?
        }
    }
    Ok(())
}
