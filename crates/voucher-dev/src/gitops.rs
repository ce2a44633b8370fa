//! `voucher-dev local --gitops`: the example Vouchers from Git instead of
//! `kubectl apply`. Flux's source-controller and kustomize-controller (built
//! from their upstream modules) and the loopback Git server join the stack; a
//! repository seeded once with `examples/vouchers` is synced into the
//! namespace by `examples/flux/vouchers.yaml` as shipped. A person clones,
//! edits and pushes; the Vouchers follow within the source's poll interval.

use std::path::Path;
use std::time::{Duration, Instant};

use voucher_testenv::flux::{Flux, Sync};
use voucher_testenv::supervisor::Signal;

use crate::stack::{self, Cluster, Process, StackSettings};

/// `--git-port`'s default: the port docs/deploy.md's commands name.
pub(crate) const DEFAULT_GIT_PORT: u16 = 29418;
/// The repository's name on the Git server, and the directory `git clone` makes.
const REPOSITORY: &str = "vouchers";
/// How often source-controller looks for a new commit: a pushed edit shows within it.
const POLL: &str = "20s";

/// The repository's clone URL.
pub(crate) fn url(git_port: u16) -> String {
    format!("http://127.0.0.1:{git_port}/voucher/{REPOSITORY}.git")
}

/// The commands that clone the repository, edit a Voucher and push: printed by the
/// banner, run word for word by `--smoke`, and quoted by docs/deploy.md.
pub(crate) fn commands(git_port: u16) -> [String; 3] {
    [
        format!(
            "git clone -c user.name=local -c user.email=local@example.om {} && cd {REPOSITORY}",
            url(git_port)
        ),
        "sed -i 's/creditOMR: 200/creditOMR: 250/' launch-campaign.yaml".into(),
        "git commit -qam 'A larger launch credit' && git push -q".into(),
    ]
}

/// Starts the Git server and both controllers, seeds the repository on the first run and
/// applies the GitRepository and Kustomization; the processes, to stop with the stack.
pub(crate) async fn start(
    settings: &StackSettings,
    cluster: &Cluster,
) -> anyhow::Result<Vec<Process>> {
    let flux = Flux::find_or_build()?;
    let dir = settings.state_dir.join("gitops");
    std::fs::create_dir_all(dir.join("artifacts"))?;
    flux.install_crds(&cluster.kubectl, &cluster.kubeconfig)?;
    let port = settings.git_port;
    let mut processes = Vec::new();
    let mut started = |cmd, name, health: u16| -> anyhow::Result<(u16, std::path::PathBuf)> {
        let log = dir.join(format!("{name}.log"));
        processes.push(stack::spawn(cmd, &log, name, Signal::TERM)?);
        Ok((health, log))
    };
    // The ports after the Git server's: the artifact server, then each controller's health.
    let waits = [
        started(
            flux.git_server_command(&dir.join("repositories"), port),
            "git-server",
            port,
        )?,
        started(
            flux.source_controller_command(
                &cluster.kubeconfig,
                &dir.join("artifacts"),
                port + 1,
                port + 2,
            ),
            "source-controller",
            port + 2,
        )?,
        started(
            flux.kustomize_controller_command(&cluster.kubeconfig, port + 3),
            "kustomize-controller",
            port + 3,
        )?,
    ];
    for (process, (port, log)) in processes.iter_mut().zip(waits) {
        stack::wait_for_port(process, port, &log).await?;
    }
    let seeded = dir.join("seeded");
    if !seeded.exists() {
        seed(&url(port)).await?;
        std::fs::write(&seeded, "")?;
    }
    let sync = Sync {
        name: REPOSITORY,
        namespace: &cluster.namespace,
        url: &url(port),
        path: "./",
        target_namespace: &cluster.namespace,
        poll: POLL,
    };
    let manifests = dir.join("flux.json");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": sync.manifests()?});
    std::fs::write(&manifests, list.to_string())?;
    print!(
        "{}",
        cluster
            .kubectl(&["apply", "-f", &manifests.to_string_lossy()])
            .await?
    );
    Ok(processes)
}

/// The first commit: `examples/vouchers` as it is in this checkout, its kustomization too.
async fn seed(url: &str) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    for (name, text) in stack::EXAMPLES.iter().chain([&(
        "kustomization.yaml",
        include_str!("../../../examples/vouchers/kustomization.yaml"),
    )]) {
        std::fs::write(work.path().join(name), text)?;
    }
    for args in [
        &["init", "--quiet", "--initial-branch=main"][..],
        &["add", "."],
        &["commit", "--quiet", "-m", "The example Vouchers"],
        &["push", "--quiet", url, "main"],
    ] {
        git(work.path(), args).await?;
    }
    println!("seeded {url} with the example Vouchers");
    Ok(())
}

async fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("git")
        .args([
            "-c",
            "user.name=voucher-dev",
            "-c",
            "user.email=local@example.om",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run git (install it: apt-get install git): {e}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The banner's part: where the repository is and how to change a Voucher through it.
pub(crate) fn print_try(git_port: u16) {
    let [clone, edit, push] = commands(git_port);
    println!(
        "\nThe Vouchers come from Git ({url}, synced by Flux every {POLL}). Change one:\n\n\
         {clone}\n{edit}\n{push}\n\
         kubectl get gitrepositories,kustomizations   # Flux's view: the revision applied, Ready\n\
         kubectl get voucher omantel-muscat-200       # GRANT 250 OMR once Flux has synced",
        url = url(git_port)
    );
}

/// `--smoke --gitops`: the Kustomization Ready on the seeded commit, then the banner's three
/// commands run as printed, and the row following the push without anyone asking Flux.
pub(crate) async fn smoke(settings: &StackSettings, cluster: &Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let ready = || async {
        cluster
            .kubectl(&[
                "get",
                "kustomization",
                REPOSITORY,
                "-n",
                &cluster.namespace,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .await
    };
    while ready().await?.trim() != "True" {
        stack::wait_until(deadline, "the Kustomization Ready").await?;
    }
    println!("smoke: Flux applied the seeded repository, Kustomization Ready");
    let work = tempfile::tempdir()?;
    let script = commands(settings.git_port).join("\n");
    let output = tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(work.path())
        .output()
        .await?;
    if !output.status.success() {
        anyhow::bail!(
            "smoke: the banner's git commands failed:\n{script}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!("smoke: cloned, edited and pushed:\n{script}");
    loop {
        let grant = cluster
            .kubectl(&[
                "get",
                "voucher",
                "omantel-muscat-200",
                "-n",
                &cluster.namespace,
                "-o",
                "jsonpath={.status.grant}",
            ])
            .await?;
        if grant.trim() == "250 OMR" {
            println!("smoke: the pushed credit reached the Voucher: {grant}");
            return Ok(());
        }
        stack::wait_until(deadline, "the pushed credit in the Voucher's status").await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/deploy.md's Flux section quotes the banner's commands, which `--smoke` runs.
    #[test]
    fn the_deploy_guide_quotes_the_commands_the_smoke_run_runs() {
        let guide = include_str!("../../../docs/deploy.md");
        for command in commands(DEFAULT_GIT_PORT) {
            assert!(
                guide.lines().any(|line| line == command),
                "docs/deploy.md lacks, word for word: {command}"
            );
        }
    }
}
