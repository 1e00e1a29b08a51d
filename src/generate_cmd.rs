//! `hakobu generate` (hidden, for packaging): shell completions and man pages
//! generated from the clap definitions (`packaging/debian/build.sh` runs it
//! into `target/`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use clap_complete::Shell;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Completions for bash (`hakobu.bash`), zsh (`_hakobu`) and fish
    /// (`hakobu.fish`), written into DIR.
    Completions { dir: PathBuf },
    /// Man pages: `hakobu.1` and one `hakobu-COMMAND.1` per command, written
    /// into DIR.
    Man { dir: PathBuf },
}

/// Writes what `args` asks for; exit code 1 and the error when a file cannot
/// be written.
pub fn run(args: GenerateArgs, cmd: clap::Command) -> Result<(), (u8, anyhow::Error)> {
    let done = match args.what {
        What::Completions { dir } => completions(cmd, &dir),
        What::Man { dir } => man(cmd, &dir),
    };
    done.map_err(|e| (1, e))
}

fn completions(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    create_dir(dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path =
            clap_complete::generate_to(shell, &mut cmd, "hakobu", dir).with_context(|| {
                format!(
                    "cannot write the {shell} completions into {}",
                    dir.display()
                )
            })?;
        println!("{}", path.display());
    }
    Ok(())
}

fn man(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    create_dir(dir)?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
    println!("{}", dir.display());
    Ok(())
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create {}; give a directory this user may write",
            dir.display()
        )
    })
}
