//! The README's walkthrough, run by `local --smoke`: the shell blocks of its
//! "Try it" and "Campaigns" sections, as written, against the stack — so the
//! front door cannot drift from what the product does.

use std::path::Path;
use std::time::Duration;

/// The README, as the tree holds it.
const README: &str = include_str!("../../../README.md");

/// The sections whose shell blocks a newcomer runs on `cargo local`, in order.
const SECTIONS: [&str; 2] = ["## Try it", "## Campaigns"];

/// The state directory the README names (`cargo local`'s default); the one thing the run
/// replaces, by the smoke stack's own.
const README_STATE_DIR: &str = "/tmp/voucher-operator-local";

/// What every script of `--smoke` starts with: stop at the first failure, trace, and fail on an
/// HTTP error as well (curl alone exits 0 on a 4xx or 5xx), still printing its JSON answer
/// (and nothing more: its output may be redirected to a file).
pub(crate) const PRELUDE: &str =
    "set -euo pipefail\nset -x\ncurl() { command curl --fail-with-body \"$@\"; }\n";

/// The ```sh blocks of the sections whose heading starts with one of `sections`, in order.
fn shell_blocks(readme: &str, sections: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut blocks = Vec::new();
    for heading in sections {
        let start = readme
            .lines()
            .position(|l| l.starts_with(heading))
            .ok_or_else(|| anyhow::anyhow!("the README has no section {heading:?}"))?;
        let mut block: Option<Vec<&str>> = None;
        let mut found = 0;
        for line in readme.lines().skip(start + 1) {
            if line.starts_with("## ") {
                break;
            }
            match (&mut block, line.trim_end()) {
                (None, "```sh") => block = Some(Vec::new()),
                (None, fence @ ("```bash" | "```shell" | "```console")) => anyhow::bail!(
                    "the README's section {heading:?} has a {fence} block: write it as ```sh, \
                     which the walkthrough runs"
                ),
                (Some(lines), "```") => {
                    blocks.push(lines.join("\n"));
                    found += 1;
                    block = None;
                }
                (Some(lines), _) => lines.push(line),
                (None, _) => {}
            }
        }
        if block.is_some() {
            anyhow::bail!("the README's section {heading:?} has a ```sh block never closed");
        }
        if found == 0 {
            anyhow::bail!("the README's section {heading:?} has no ```sh block");
        }
    }
    Ok(blocks)
}

/// The walkthrough as one bash script: stops at the first command that fails.
fn script(readme: &str, state_dir: &Path) -> anyhow::Result<String> {
    let blocks = shell_blocks(readme, &SECTIONS)?;
    let body = blocks
        .join("\n")
        .replace(README_STATE_DIR, &state_dir.to_string_lossy());
    Ok(format!("{PRELUDE}{body}\n"))
}

/// Runs the walkthrough in the tree's root (its paths are relative to it): an error with the
/// output when a command fails.
pub(crate) async fn run(state_dir: &Path) -> anyhow::Result<()> {
    let script = script(README, state_dir)?;
    let output = run_script("the README's walkthrough", &script).await?;
    println!(
        "smoke: the README's walkthrough ran as written ({} commands); the last of its output:\n{output}",
        script
            .lines()
            .skip(PRELUDE.lines().count())
            .filter(|l| is_command(l))
            .count(),
    );
    Ok(())
}

/// Runs `script` with bash in the tree's root: the end of its output, or an error with the end
/// of its trace and output.
pub(crate) async fn run_script(what: &str, script: &str) -> anyhow::Result<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let child = tokio::process::Command::new("bash")
        .args(["-c", script])
        .current_dir(&root)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), child)
        .await
        .map_err(|_| anyhow::anyhow!("smoke: {what} ran over 10 minutes"))??;
    let shown = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    if !output.status.success() {
        anyhow::bail!(
            "smoke: {what} failed ({}); the last of its trace:\n{}\n{}",
            output.status,
            shown(&output.stderr),
            shown(&output.stdout)
        );
    }
    Ok(shown(&output.stdout))
}

fn is_command(line: &str) -> bool {
    let line = line.trim();
    !line.is_empty() && !line.starts_with('#')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_walkthrough_is_the_readmes_try_it_and_campaign_blocks() {
        let script = script(README, Path::new("/state")).unwrap();
        assert!(script.contains("source /state/env"), "{script}");
        assert!(!script.contains(README_STATE_DIR), "{script}");
        for command in [
            "kubectl get vouchers",
            "kubectl apply -n billing -f examples/campaigns/bill-inserts.yaml",
            "campaign codes -n billing bill-2027",
        ] {
            assert!(script.contains(command), "{command}: {script}");
        }
    }

    #[test]
    fn a_section_without_a_shell_block_is_an_error_not_an_empty_walkthrough() {
        let readme = "# x\n## Try it\nno block\n## Campaigns\n```sh\nls\n```\n";
        let error = shell_blocks(readme, &SECTIONS).unwrap_err().to_string();
        assert!(error.contains("Try it"), "{error}");
        let readme = "# x\n## Try it\n```sh\ntrue\n```\n```yaml\nx: 1\n```\n## Campaigns: a\n```sh\nls\n```\n";
        assert_eq!(shell_blocks(readme, &SECTIONS).unwrap(), ["true", "ls"]);
        let open = "## Try it\n```sh\ntrue\n## Campaigns\n```sh\nls\n```\n";
        assert!(shell_blocks(open, &SECTIONS).is_err(), "an unclosed block");
        let bash = "## Try it\n```bash\ntrue\n```\n## Campaigns\n```sh\nls\n```\n";
        assert!(
            shell_blocks(bash, &SECTIONS).is_err(),
            "a block it would not run"
        );
    }
}
