//! `skillmesh keys`: the node's identity.

use skillmesh::identity::{Identity, KEY_FILE};

use super::{CliError, Context, print_json};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum Command {
    /// Print the PeerId and the Ed25519 public key.
    Show,
}

pub(crate) async fn run(ctx: &Context, cmd: Command) -> Result<(), CliError> {
    match cmd {
        Command::Show => {
            let path = ctx.data_dir.join(KEY_FILE);
            if !path.exists() {
                return Err(CliError::failure(format!(
                    "no identity in {}; create one with: skillmesh init",
                    ctx.data_dir.display()
                )));
            }
            let id = Identity::load(&path).map_err(CliError::failure)?;
            let public = hex::encode(id.signing_key().public_key());
            if ctx.json {
                print_json(&serde_json::json!({
                    "peer_id": id.peer_id().to_string(),
                    "ed25519_public_key": public,
                    "key_file": path,
                }));
            } else {
                println!("peer id:            {}", id.peer_id());
                println!("ed25519 public key: {public}");
                println!("key file:           {}", path.display());
            }
            Ok(())
        }
    }
}
