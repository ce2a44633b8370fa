//! The chart's admission policy on the stack's own cluster (who may adopt or reissue a code,
//! the namespaces' credit caps), and a namespace editor who is not an adopter, `jane`, to try
//! it with: `kubectl --as=jane …`.

use std::time::{Duration, Instant};

use crate::stack::{self, Cluster, StackSettings};

/// The policy and its bindings as the chart renders them with its default adopters (the
/// group system:masters, which the stack's admin kubeconfig is in); tests/chart/admission.rs
/// checks that this is still the chart's.
const POLICY: &str = include_str!("admission.yaml");

/// A user who may do anything to the Vouchers of the issuer namespaces, and is no adopter.
pub(crate) const EDITOR: &str = "jane";

/// What the banner prints to try the policy, and what `--smoke` runs.
fn refused_command(namespace: &str) -> [String; 2] {
    [
        format!(
            "kubectl patch voucher partner-welcome -n {namespace} --as={EDITOR} --type merge -p '{{\"spec\":{{\"adopt\":true}}}}'"
        ),
        "# refused: jane may edit Vouchers, but only the chart's admission.adopters may adopt"
            .into(),
    ]
}

/// Applies the policy, and the Role and RoleBinding that make `jane` an editor of the Vouchers
/// and campaigns of every issuer namespace and of the examples' namespace.
pub(crate) async fn install(settings: &StackSettings, cluster: &Cluster) -> anyhow::Result<()> {
    let dir = settings.state_dir.join("admission");
    std::fs::create_dir_all(&dir)?;
    let mut documents = vec![POLICY.to_owned()];
    // The issuer namespaces, and the examples' (where the printed try edits), once each.
    let mut namespaces: Vec<&str> = settings
        .issuer_namespaces
        .iter()
        .map(String::as_str)
        .collect();
    namespaces.push(&cluster.namespace);
    namespaces.sort_unstable();
    namespaces.dedup();
    for namespace in namespaces {
        documents.push(editor(namespace));
    }
    let file = dir.join("admission.yaml");
    std::fs::write(&file, documents.join("\n---\n"))?;
    cluster
        .kubectl(&["apply", "--server-side", "-f", &file.to_string_lossy()])
        .await?;
    Ok(())
}

fn editor(namespace: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: voucher-editor, namespace: {namespace}}}
rules:
  - apiGroups: [catalyst.openova.io]
    resources: [vouchers, vouchercampaigns]
    verbs: ['*']
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: voucher-editor-{EDITOR}, namespace: {namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: voucher-editor}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {EDITOR}}}]"
    )
}

pub(crate) fn print_try(cluster: &Cluster) {
    let [command, why] = refused_command(&cluster.namespace);
    println!("\nThe chart's admission policy holds here too:\n\n{command}   {why}");
}

/// `--smoke`: the printed command is refused by the policy (not by RBAC: its message is the
/// policy's), once the policy has taken effect.
pub(crate) async fn smoke(cluster: &Cluster) -> anyhow::Result<()> {
    let [command, _] = refused_command(&cluster.namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = tokio::process::Command::new("bash")
            .args(["-c", &command])
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("PATH", path_with(cluster))
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() && stderr.contains("spec.adopt takes over a code") {
            println!("smoke: {EDITOR} may not adopt: {}", stderr.trim());
            return Ok(());
        }
        if output.status.success() {
            // Admitted before the policy took effect: undo it and try again.
            cluster
                .kubectl(&[
                    "patch",
                    "voucher",
                    "partner-welcome",
                    "-n",
                    &cluster.namespace,
                    "--type",
                    "json",
                    "-p",
                    r#"[{"op":"remove","path":"/spec/adopt"}]"#,
                ])
                .await?;
        } else if !stderr.contains("ValidatingAdmissionPolicy") {
            anyhow::bail!("smoke: `{command}` failed otherwise than by the policy: {stderr}");
        }
        stack::wait_until(deadline, "the admission policy to refuse jane's adopt").await?;
    }
}

fn path_with(cluster: &Cluster) -> std::ffi::OsString {
    let mut paths: Vec<std::path::PathBuf> = cluster
        .kubectl
        .parent()
        .into_iter()
        .map(Into::into)
        .collect();
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap_or_default()
}
