//! `skillmesh config`: the effective configuration after every layer.

use super::{CliError, Context, print_json};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum Command {
    /// Print the effective configuration (file, environment and --set applied).
    Show,
    /// Check the configuration; exit 2 with the bad key and value if it is invalid.
    Check,
}

pub(crate) async fn run(ctx: &Context, cmd: Command) -> Result<(), CliError> {
    let mut config = ctx.load_config()?;
    if !config.mesh.psk.is_empty() {
        config.mesh.psk = "<hidden>".to_owned();
    }
    match cmd {
        Command::Show if ctx.json => {
            print_json(&serde_json::to_value(&config).map_err(CliError::failure)?);
        }
        Command::Show => {
            print!(
                "{}",
                toml::to_string_pretty(&config).map_err(CliError::failure)?
            );
        }
        Command::Check if ctx.json => print_json(&serde_json::json!({"ok": true})),
        Command::Check => println!("config ok"),
    }
    Ok(())
}
