//! `skillmesh init`: identity and default config in the data dir.

use skillmesh::config::Config;
use skillmesh::identity::Identity;

use super::{CliError, Context, print_json};

#[derive(clap::Args, Debug)]
pub(crate) struct Args {}

pub(crate) async fn run(ctx: &Context, _args: Args) -> Result<(), CliError> {
    std::fs::create_dir_all(&ctx.data_dir).map_err(|e| {
        CliError::failure(format!(
            "cannot create data dir {}: {e}",
            ctx.data_dir.display()
        ))
    })?;
    let (identity, created) = Identity::load_or_create(&ctx.data_dir).map_err(CliError::failure)?;
    let wrote_config = if ctx.config_path.exists() {
        // An existing config must still be valid: init is also how people check a setup.
        ctx.load_config()?;
        false
    } else {
        std::fs::write(&ctx.config_path, Config::default_file()).map_err(|e| {
            CliError::failure(format!("cannot write {}: {e}", ctx.config_path.display()))
        })?;
        true
    };
    if ctx.json {
        print_json(&serde_json::json!({
            "peer_id": identity.peer_id().to_string(),
            "data_dir": ctx.data_dir,
            "config": ctx.config_path,
            "created_identity": created,
            "created_config": wrote_config,
        }));
    } else {
        let what = if created { "created" } else { "existing" };
        println!("{}", identity.peer_id());
        eprintln!(
            "{what} identity in {}; config {}{}",
            ctx.data_dir.display(),
            ctx.config_path.display(),
            if wrote_config { " (new)" } else { "" }
        );
    }
    Ok(())
}
