//! Man pages and shell completions generated from sitecast's command lines, so the packages
//! ship documentation that cannot drift from the flags. Each binary has a hidden
//! `generate-docs DIR` subcommand that hands its clap command to [`write`].

use std::path::Path;

use clap_complete::Shell;

/// Writes into `dir`:
/// - `man/NAME.1`, and `man/NAME-SUB.1` for every subcommand (as git and cargo do);
/// - `completions/NAME.bash`, `completions/_NAME` (zsh), `completions/NAME.fish`.
pub fn write(mut command: clap::Command, dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // The generator itself is for packagers, not for a man page; `help` subcommands would
    // each get a page saying what `--help` says.
    if command.find_subcommand("generate-docs").is_some() {
        command = command.mut_subcommand("generate-docs", |sub| sub.hide(true));
    }
    command = without_help_subcommands(command);
    command.build();
    clap_mangen::generate_to(command.clone(), &man)?;
    let name = command.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, &name, &completions)?;
    }
    Ok(())
}

fn without_help_subcommands(command: clap::Command) -> clap::Command {
    let names: Vec<String> =
        command.get_subcommands().map(|sub| sub.get_name().to_owned()).collect();
    names.iter().fold(command.disable_help_subcommand(true), |command, name| {
        command.mut_subcommand(name, without_help_subcommands)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> clap::Command {
        clap::Command::new("sitecast-example")
            .about("An example tool")
            .subcommand(
                clap::Command::new("run").about("Runs it").arg(clap::arg!(--fast "Quickly")),
            )
            .subcommand(clap::Command::new("generate-docs").hide(true))
    }

    #[test]
    fn a_command_without_subcommands_gets_its_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = clap::Command::new("sitecast-plain").arg(clap::arg!(--store <DIR> "Where"));
        write(plain, dir.path()).expect("write");
        let page = std::fs::read_to_string(dir.path().join("man/sitecast-plain.1")).expect("page");
        assert!(page.contains("store"), "{page}");
    }

    #[test]
    fn every_subcommand_gets_a_page_and_every_shell_its_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(example(), dir.path()).expect("write");
        let page =
            std::fs::read_to_string(dir.path().join("man/sitecast-example.1")).expect("page");
        assert!(page.starts_with(".ie") || page.contains(".TH sitecast-example 1"), "{page}");
        let run =
            std::fs::read_to_string(dir.path().join("man/sitecast-example-run.1")).expect("run");
        assert!(run.contains("fast"), "{run}");
        assert!(!dir.path().join("man/sitecast-example-generate-docs.1").exists());
        assert!(!dir.path().join("man/sitecast-example-help.1").exists());
        let bash = std::fs::read_to_string(dir.path().join("completions/sitecast-example.bash"))
            .expect("bash");
        assert!(bash.contains("--fast"), "{bash}");
        assert!(dir.path().join("completions/_sitecast-example").exists());
        assert!(dir.path().join("completions/sitecast-example.fish").exists());
    }
}
