//! What `cargo local` prints once everything runs, and the variables it
//! defines: printed as `export` lines and written to `<state>/env`, so that
//! another terminal (or the README's walkthrough) takes them with one
//! `source`.

use std::path::{Path, PathBuf};

/// The file in the state directory that holds the banner's variables.
pub(crate) const ENV_FILE: &str = "env";

/// The banner's variables, in the order they are printed.
pub(crate) struct Exports {
    lines: Vec<String>,
}

/// What the variables are made of.
pub(crate) struct Values<'a> {
    pub state_dir: &'a Path,
    pub kubeconfig: &'a Path,
    pub kubectl_dir: &'a Path,
    pub base: &'a str,
    pub token: &'a str,
    pub service: &'a str,
    pub database_url: &'a str,
    pub nats_url: &'a str,
    pub operator: &'a Path,
}

impl Exports {
    pub(crate) fn new(values: &Values) -> Self {
        let path = |p: &Path| quote(&p.to_string_lossy());
        let mut lines = vec![
            format!(
                "export LOCAL_STATE_DIR={}   # this stack's (cargo local token signs for it)",
                path(values.state_dir)
            ),
            format!("export KUBECONFIG={}", path(values.kubeconfig)),
        ];
        // A kubectl found on PATH as a bare name is on PATH already.
        if !values.kubectl_dir.as_os_str().is_empty() {
            lines.push(format!(
                "export PATH={}:\"$PATH\"   # the kubectl built with the API server",
                path(values.kubectl_dir)
            ));
        }
        lines.extend([
            format!(
                "export TOKEN={}   # a superadmin's development token, valid a day",
                quote(values.token)
            ),
            format!(
                "export ADMIN=\"$TOKEN\" ADMIN_API={}   # an administrator's token, and where the \
                 admin endpoints are (a cluster: the -admin Service)",
                quote(values.base)
            ),
            format!(
                "export SERVICE={}   # the billing service's checkout token (role billing-service)",
                quote(values.service)
            ),
            format!(
                "export DATABASE_URL={}   # for campaign codes, report and export",
                quote(values.database_url)
            ),
            format!("export NATS_URL={}   # for events", quote(values.nats_url)),
            format!(
                "export VOUCHER_OPERATOR={}   # the voucher-operator binary built from this tree",
                path(values.operator)
            ),
        ]);
        Self { lines }
    }

    /// Writes `<state>/env`: the same lines, to `source`.
    pub(crate) fn write(&self, state_dir: &Path) -> anyhow::Result<PathBuf> {
        let file = state_dir.join(ENV_FILE);
        let text = format!(
            "# The variables of `cargo local` (its banner prints them too): source {}\n{}\n",
            file.display(),
            self.lines.join("\n")
        );
        std::fs::write(&file, text)?;
        Ok(file)
    }

    fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A value for the shell as it is: single quotes when it holds anything else than the
/// characters of a URL, a path or a token.
fn quote(value: &str) -> String {
    let plain = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:@=,%+".contains(c));
    match plain && !value.is_empty() {
        true => value.to_owned(),
        false => format!("'{}'", value.replace('\'', r"'\''")),
    }
}

/// A command the banner prints; `--smoke` runs those that end by themselves.
struct Try {
    line: String,
    /// Runs until interrupted (`--follow`, `tail -f`, `psql`): printed, not run by `--smoke`.
    interactive: bool,
}

/// The banner's commands, after its exports.
fn commands(state_dir: &Path, base: &str) -> Vec<Try> {
    let order = |id: &str| {
        let order = if id.is_empty() {
            String::new()
        } else {
            format!("\"order_id\":\"{id}\",")
        };
        format!(
            "'{{\"user_id\":\"local-developer\",{order}\"lines\":[{{\"id\":\"1\",\"category\":\"install\",\"amount\":50000}},{{\"id\":\"2\",\"category\":\"support\",\"amount\":8000}}]}}'"
        )
    };
    let run = |line: String| Try {
        line,
        interactive: false,
    };
    let interactive = |line: String| Try {
        line,
        interactive: true,
    };
    vec![
        run("kubectl version".into()),
        run("kubectl get vouchers".into()),
        run("kubectl describe voucher omantel-muscat-200".into()),
        run(format!(
            "curl -s {base}/billing/vouchers/redeem-preview -d '{{\"code\":\"omantel-muscat-200\"}}'"
        )),
        run(format!(
            "curl -s {base}/billing/vouchers/redeem -H \"Authorization: Bearer $TOKEN\" -d '{{\"code\":\"OMANTEL-MUSCAT-200\",\"tenant_id\":\"acme\"}}'"
        )),
        run(format!(
            "curl -s {base}/billing/vouchers/redeem -H \"Authorization: Bearer $TOKEN\" -d '{{\"code\":\"INSTALLS-20-3M\",\"tenant_id\":\"acme\"}}'   # a discount grant"
        )),
        run(format!(
            "curl -s {base}/billing/vouchers/checkout/quote -H \"Authorization: Bearer $SERVICE\" -d {}",
            order("")
        )),
        run(format!(
            "curl -s {base}/billing/vouchers/checkout/commit -H \"Authorization: Bearer $SERVICE\" -d {}",
            order("ORDER-1")
        )),
        interactive("$VOUCHER_OPERATOR events --follow    # the audit events as they happen".into()),
        run("cargo local token --sub alice        # a customer's token (--role sovereign-admin for an admin)".into()),
        interactive(format!(
            "tail -f {}/operator.log        # the operator's log (-v prints it here too)",
            state_dir.display()
        )),
        interactive("psql \"$DATABASE_URL\"".into()),
    ]
}

/// What to try, once everything runs.
pub(crate) fn print_try(state_dir: &Path, exports: &Exports, env_file: &Path, base: &str) {
    let commands: Vec<String> = commands(state_dir, base)
        .into_iter()
        .map(|c| c.line)
        .collect();
    println!(
        "\nvoucher-operator is running locally (state in {state}). Try, in another terminal \
         (`source {env}` defines the same variables):\n\n{exports}\n{commands}",
        state = state_dir.display(),
        env = env_file.display(),
        exports = exports.text(),
        commands = commands.join("\n"),
    );
}

/// `--smoke`: the banner's commands that end by themselves, as printed, in the tree's root,
/// after its env file; an HTTP error fails the run (curl with --fail-with-body).
pub(crate) async fn smoke(state_dir: &Path, env_file: &Path, base: &str) -> anyhow::Result<()> {
    let lines: Vec<String> = commands(state_dir, base)
        .into_iter()
        .filter(|c| !c.interactive)
        .map(|c| c.line)
        .collect();
    let script = format!(
        "{}source {}\n{}\n",
        crate::walkthrough::PRELUDE,
        quote(&env_file.to_string_lossy()),
        lines.join("\n")
    );
    let output = crate::walkthrough::run_script("the banner's commands", &script).await?;
    println!(
        "smoke: the banner's {} commands ran as printed; the last of their output:\n{output}",
        lines.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_the_shell_would_split_or_expand_is_quoted() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:25432/billing",
                "postgres://postgres@127.0.0.1:25432/billing",
                "a URL as it is",
            ),
            ("/tmp/a b/kubeconfig", "'/tmp/a b/kubeconfig'", "a space"),
            ("$HOME", "'$HOME'", "no expansion"),
            ("it's", r"'it'\''s'", "a quote inside"),
            ("", "''", "empty stays an argument"),
        ];
        for (value, quoted, reason) in cases {
            assert_eq!(quote(value), quoted, "{reason}");
        }
    }

    #[test]
    fn the_env_file_defines_what_the_readme_uses() {
        let dir = tempfile::tempdir().unwrap();
        let exports = Exports::new(&Values {
            state_dir: dir.path(),
            kubeconfig: &dir.path().join("kubeconfig"),
            kubectl_dir: Path::new("/opt/kube bin"),
            base: "http://127.0.0.1:28080",
            token: "a.b.c",
            service: "d.e.f",
            database_url: "postgres://postgres@127.0.0.1:25432/billing",
            nats_url: "nats://127.0.0.1:24222",
            operator: Path::new("/repo/target/debug/voucher-operator"),
        });
        let file = exports.write(dir.path()).unwrap();
        let script = format!(
            "set -eu; PATH=/usr/bin:/bin; source {}; \
             test \"$LOCAL_STATE_DIR\" = {}; echo \"$KUBECONFIG|$TOKEN|$ADMIN|$ADMIN_API|$SERVICE|$DATABASE_URL|$NATS_URL|$VOUCHER_OPERATOR|${{PATH%%:*}}\"",
            file.display(),
            dir.path().display()
        );
        let output = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!(
                "{}|a.b.c|a.b.c|http://127.0.0.1:28080|d.e.f|postgres://postgres@127.0.0.1:25432/billing|\
                 nats://127.0.0.1:24222|/repo/target/debug/voucher-operator|/opt/kube bin",
                dir.path().join("kubeconfig").display()
            )
        );
    }
}
