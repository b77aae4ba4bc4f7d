use clap::{Parser, Subcommand};

/// A Kubernetes operator that delivers signed webhooks for document events.
#[derive(Parser, Debug)]
#[command(name = "hookrelay", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (what crds/ holds).
    Crds,
    /// Print the version.
    Version,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => print!("{}", hookrelay::crd::crds_yaml()),
        Command::Version => println!("hookrelay {}", env!("CARGO_PKG_VERSION")),
    }
    Ok(())
}
