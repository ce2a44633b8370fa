//! What ships beside the chart: its CRD, the Containerfile, the Flux examples.

use std::collections::BTreeSet;

use super::*;

#[test]
fn the_chart_crd_is_the_generated_one() {
    for (file, generated) in [
        ("voucher.yaml", voucher_operator::api::crd_yaml()),
        (
            "vouchercampaign.yaml",
            voucher_operator::api::campaign::crd_yaml(),
        ),
    ] {
        let committed = std::fs::read_to_string(chart_dir().join("crds").join(file)).unwrap();
        assert!(
            committed == generated,
            "charts/voucher-operator/crds/{file} is out of date: cp crds/{file} charts/voucher-operator/crds/"
        );
    }
    let rendered = render(required());
    let names: Vec<&Value> = rendered
        .all("CustomResourceDefinition")
        .into_iter()
        .map(|crd| &crd["metadata"]["name"])
        .collect();
    assert_eq!(
        names,
        [
            "vouchers.catalyst.openova.io",
            "vouchercampaigns.catalyst.openova.io"
        ]
    );
}

fn flux_example(file: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("examples/flux").join(file)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// No Flux schema can be fetched here: the Flux examples are checked by shape, and by what they
/// point at (the chart, the Voucher directory) and what they set (values the chart accepts).
#[test]
fn the_flux_examples_point_at_the_chart_and_the_vouchers() {
    let source = flux_example("gitrepository.yaml");
    assert_eq!(source["apiVersion"], "source.toolkit.fluxcd.io/v1");
    assert_eq!(source["kind"], "GitRepository");
    assert!(
        source["spec"]["ref"]["tag"]
            .as_str()
            .is_some_and(|t| t == format!("v{}", env!("CARGO_PKG_VERSION")))
    );
    let kept = source["spec"]["ignore"].as_str().unwrap();
    for needed in ["!/charts/", "!/crds/", "!/examples/"] {
        assert!(kept.contains(needed), "the source keeps {needed}");
    }
    let source_ref = json!({"kind": "GitRepository", "name": source["metadata"]["name"]});

    let release = flux_example("helmrelease.yaml");
    assert_eq!(release["apiVersion"], "helm.toolkit.fluxcd.io/v2");
    assert_eq!(release["kind"], "HelmRelease");
    let chart = &release["spec"]["chart"]["spec"];
    assert_eq!(chart["sourceRef"], source_ref);
    let chart_path = repo().join(chart["chart"].as_str().unwrap());
    assert_eq!(
        chart_path.canonicalize().unwrap(),
        chart_dir().canonicalize().unwrap()
    );
    for phase in ["install", "upgrade"] {
        assert_eq!(release["spec"][phase]["crds"], "CreateReplace", "{phase}");
    }
    let rendered = render(release["spec"]["values"].clone());
    rendered.assert_valid();
    assert_eq!(rendered.all("ServiceMonitor").len(), 1);

    let vouchers = flux_example("vouchers.yaml");
    assert_eq!(vouchers["apiVersion"], "kustomize.toolkit.fluxcd.io/v1");
    assert_eq!(vouchers["kind"], "Kustomization");
    assert_eq!(vouchers["spec"]["sourceRef"], source_ref);
    assert_eq!(vouchers["spec"]["prune"], true);
    let path = repo().join(vouchers["spec"]["path"].as_str().unwrap());
    assert!(
        path.join("kustomization.yaml").exists(),
        "{} has a kustomization",
        path.display()
    );
}

/// No container engine runs here, so the image is not built in the tests; what the chart relies
/// on is read off the Containerfile: the binary it runs, the user it runs as, a locked build.
#[test]
fn the_containerfile_builds_the_binary_the_chart_runs() {
    let containerfile = std::fs::read_to_string(repo().join("Containerfile")).unwrap();
    let stages: Vec<&str> = containerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "multi-stage: build, then a small runtime");
    assert!(stages[1].contains("distroless") && stages[1].contains("nonroot"));
    // Only the operator package: the development crates never reach the image.
    assert!(
        containerfile
            .contains("cargo build --release --locked -p voucher-operator --bin voucher-operator")
    );
    assert!(containerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/voucher-operator"]"#));
    assert_eq!(image_user(), 65532);
    let rust: Vec<u32> = containerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let needed: Vec<u32> = env!("CARGO_PKG_RUST_VERSION")
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        rust >= needed,
        "the build image's Rust {rust:?} is at least rust-version {needed:?}"
    );
}

/// The runtime image (distroless/cc) has glibc and libgcc_s and nothing else: the binary must not
/// need more. Read off the binary the tests built (same dependencies as the release build).
#[test]
fn the_binary_needs_only_what_distroless_cc_has() {
    let output = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_voucher-operator"))
        .output()
        .expect("ldd (Debian's libc-bin)");
    assert!(output.status.success());
    let needed: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|lib| lib.rsplit('/').next().unwrap().to_owned())
        .collect();
    let provided = [
        "linux-vdso.so.1",
        "libgcc_s.so.1",
        "libm.so.6",
        "libc.so.6",
        "ld-linux-x86-64.so.2",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
    ];
    let missing: Vec<&String> = needed
        .iter()
        .filter(|lib| !provided.contains(&lib.as_str()))
        .collect();
    assert!(missing.is_empty(), "not in distroless/cc: {missing:?}");
    assert!(needed.iter().any(|l| l == "libc.so.6"), "{needed:?}");
}

/// Flux (>= 2.5) judges each Voucher with the example's `healthCheckExprs`: inProgress, then
/// failed, then current; none true, or an expression that cannot be evaluated (a missing field),
/// leaves it in progress. Evaluated here with the `cel` crate (the CEL engine kube's `cel` feature
/// uses; Flux uses cel-go) on the statuses the controller writes.
#[test]
fn the_flux_health_expressions_judge_the_statuses_the_controller_writes() {
    use voucher_operator::controller::voucher::status::{Outcome, desired};
    use voucher_operator::domain::{CodeRecord, Owner, Phase, Terms};

    let vouchers = flux_example("vouchers.yaml");
    assert_eq!(vouchers["spec"]["wait"], true);
    let exprs = &vouchers["spec"]["healthCheckExprs"][0];
    assert_eq!(exprs["apiVersion"], "catalyst.openova.io/v1alpha1");
    assert_eq!(exprs["kind"], "Voucher");
    let judge = |object: &Value| -> &'static str {
        let mut context = cel::Context::default();
        for (key, value) in object.as_object().unwrap() {
            context.add_variable(key.as_str(), value.clone()).unwrap();
        }
        for (field, verdict) in [
            ("inProgress", "InProgress"),
            ("failed", "Failed"),
            ("current", "Current"),
        ] {
            let program = cel::Program::compile(exprs[field].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{field}: {e}"));
            match program.execute(&context) {
                Ok(cel::Value::Bool(true)) => return verdict,
                Ok(_) => {}
                Err(_) => return "InProgress",
            }
        }
        "InProgress"
    };
    let generation = 2;
    let voucher = |status: Option<Value>| {
        let mut object = json!({
            "apiVersion": "catalyst.openova.io/v1alpha1",
            "kind": "Voucher",
            "metadata": {"name": "launch", "namespace": "billing", "generation": generation},
            "spec": {"creditOMR": 5},
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        object
    };
    let now = chrono::Utc::now();
    let written = |outcome: Outcome<'_>| {
        Some(serde_json::to_value(desired(outcome, generation, now, None)).unwrap())
    };
    let record = CodeRecord {
        global_gone: None,
        once_anywhere: false,
        code: "LAUNCH".into(),
        terms: Terms::granting(5),
        times_redeemed: 0,
        created_at: now,
        deleted_at: None,
        campaign_on: None,
        suspended: false,
    };
    let holder = Owner {
        namespace: "billing".into(),
        name: "other".into(),
        uid: "u".into(),
    };
    let failed = |reason, retrying| {
        written(Outcome::Failed {
            phase: Phase::Error,
            reason,
            message: "m".into(),
            retrying,
        })
    };
    let mut stale = written(Outcome::Synced {
        record: &record,
        phase: Phase::Active,
    })
    .unwrap();
    stale["observedGeneration"] = json!(generation - 1);

    let cases = [
        ("not seen by the operator yet", voucher(None), "InProgress"),
        (
            "status of the previous generation",
            voucher(Some(stale)),
            "InProgress",
        ),
        (
            "active",
            voucher(written(Outcome::Synced {
                record: &record,
                phase: Phase::Active,
            })),
            "Current",
        ),
        (
            "scheduled",
            voucher(written(Outcome::Synced {
                record: &record,
                phase: Phase::Scheduled,
            })),
            "Current",
        ),
        (
            "code conflict",
            voucher(written(Outcome::Conflict {
                code: "LAUNCH",
                holder: &holder,
            })),
            "Failed",
        ),
        (
            "invalid code",
            voucher(failed("InvalidCode", false)),
            "Failed",
        ),
        (
            "database unreachable, retrying",
            voucher(failed("DatabaseUnavailable", true)),
            "InProgress",
        ),
    ];
    for (case, object, expected) in cases {
        assert_eq!(judge(&object), expected, "{case}");
    }
}

/// docs/deploy.md's "real cluster in ten minutes": its text, and its shell lines with their
/// continuations joined and spaces collapsed.
fn quickstart() -> (String, Vec<String>) {
    let guide = std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap();
    let section = guide
        .split("## A real cluster in ten minutes\n")
        .nth(1)
        .expect("the quickstart")
        .split("\n## ")
        .next()
        .unwrap()
        .to_owned();
    let lines = section
        .replace("\\\n", " ")
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    (section, lines)
}

/// The values the quickstart's `helm install` gives: the `kind.yaml` it writes (with an address
/// for `$API`), then each `--set`.
fn quickstart_values(section: &str, install: &str) -> Value {
    let heredoc = section
        .split("cat > kind.yaml <<YAML\n")
        .nth(1)
        .and_then(|rest| rest.split("\nYAML\n").next())
        .expect("the kind.yaml it writes")
        .replace("$API", "172.18.0.2");
    let mut values: Value = serde_yaml::from_str(&heredoc).unwrap();
    let words: Vec<&str> = install.split(' ').collect();
    for pair in words.windows(2).filter(|w| w[0] == "--set").map(|w| w[1]) {
        let (path, value) = pair.split_once('=').expect("--set key=value");
        let patch = path
            .rsplit('.')
            .fold(json!(value), |inner, key| json!({ key: inner }));
        merge(&mut values, patch);
    }
    values
}

/// The Secret keys rendered pods must read (secretKeyRef not optional, a Secret volume's items),
/// and the images they run.
fn secrets_and_images(rendered: &Rendered) -> (BTreeSet<(String, String)>, BTreeSet<String>) {
    fn walk(value: &Value, read: &mut BTreeSet<(String, String)>, images: &mut BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                let secret = map.get("secretKeyRef");
                if let Some(secret) = secret.filter(|s| s["optional"] != true) {
                    let name = secret["name"].as_str().unwrap().to_owned();
                    read.insert((name, secret["key"].as_str().unwrap().to_owned()));
                }
                // A Secret volume's items: files of those keys.
                if let Some(name) = map.get("secretName").and_then(|n| n.as_str()) {
                    for item in map
                        .get("items")
                        .and_then(|i| i.as_array())
                        .into_iter()
                        .flatten()
                    {
                        read.insert((name.to_owned(), item["key"].as_str().unwrap().to_owned()));
                    }
                }
                if let Some(image) = map.get("image").and_then(|i| i.as_str()) {
                    images.insert(image.to_owned());
                }
                map.values().for_each(|v| walk(v, read, images));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, read, images)),
            _ => {}
        }
    }
    let (mut read, mut images) = (BTreeSet::new(), BTreeSet::new());
    for object in &rendered.objects {
        walk(&object.object, &mut read, &mut images);
    }
    (read, images)
}

/// docs/deploy.md's "real cluster in ten minutes" cannot run here (no container engine), so
/// what it tells the chart is checked instead: its `helm install` (every `--set` and the
/// `kind.yaml` it writes) renders cleanly, the Secrets it creates are every Secret key the pods
/// read, the image it builds is the one they run, and every namespace the release uses is one
/// it creates first (or one the chart makes).
#[test]
fn the_real_cluster_quickstart_installs_what_the_chart_renders() {
    let (section, lines) = quickstart();
    let command =
        |prefix: &str| -> Vec<&String> { lines.iter().filter(|l| l.starts_with(prefix)).collect() };
    let install = command("helm install voucher-operator charts/voucher-operator");
    assert_eq!(install.len(), 1, "one helm install of the chart");
    assert!(install[0].contains("-n voucher-operator") && install[0].contains("-f kind.yaml"));
    let values = quickstart_values(&section, install[0]);
    let rendered = render_release(chart_dir(), "voucher-operator", "voucher-operator", values);
    rendered.assert_valid();

    // `kubectl -n voucher-operator create secret generic <name> --from-literal=<key>=…`.
    let mut created = BTreeSet::new();
    for line in command("kubectl -n voucher-operator create secret generic") {
        let words: Vec<&str> = line.split(' ').collect();
        let name = words[6];
        for literal in words
            .iter()
            .filter_map(|w| w.strip_prefix("--from-literal="))
        {
            created.insert((
                name.to_owned(),
                literal.split('=').next().unwrap().to_owned(),
            ));
        }
    }
    let (read, images) = secrets_and_images(&rendered);
    assert_eq!(
        read, created,
        "the Secret keys the pods read are the ones it creates"
    );

    let built = command("docker build -t ");
    let tag = built[0].split(' ').nth(3).unwrap();
    assert_eq!(
        images,
        BTreeSet::from([tag.to_owned()]),
        "the image it builds"
    );
    assert!(
        command("kind load docker-image ")[0].contains(tag),
        "and loads into kind"
    );

    // The namespaces: created before the install, or made by the chart itself.
    let mut namespaces: BTreeSet<String> = command("kubectl create namespace ")
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        .collect();
    namespaces.extend(
        rendered
            .all("Namespace")
            .iter()
            .map(|n| n["metadata"]["name"].as_str().unwrap().to_owned()),
    );
    for object in &rendered.objects {
        if let Some(ns) = object.object["metadata"]["namespace"].as_str() {
            assert!(
                namespaces.contains(ns),
                "{} {} is in {ns}, which the quickstart never creates",
                object.object["kind"],
                object.object["metadata"]["name"]
            );
        }
    }
}
