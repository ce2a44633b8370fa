//! The billing database over TLS: a Postgres that accepts only TLS connections (`hostnossl …
//! reject`), with a certificate of a test CA. The operator connects with `sslmode=verify-full`
//! and the CA as `sslrootcert`, as docs/deploy.md tells a deployment to; a server whose
//! certificate another CA signed — someone in the middle — is refused; and without TLS the
//! database refuses the operator, so the connections that work are encrypted.

mod support;

use std::path::Path;

use voucher_operator::store::{DatabaseSettings, Store};
use voucher_testenv::control_plane::Pki;

async fn connect(url: &str) -> Result<Store, String> {
    let settings = DatabaseSettings {
        url: url.to_owned(),
        // The migration holds its lock on one connection while it works on another.
        max_connections: 4,
        ..Default::default()
    };
    Store::connect(&settings).await.map_err(|e| {
        // The whole chain: the store names the server, its sources say why.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    })
}

fn verify_full(url: &str, ca: &Path) -> String {
    format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display())
}

#[tokio::test]
async fn the_billing_database_is_reached_over_tls_and_a_server_of_another_ca_is_refused() {
    voucher_operator::install_tls_provider();
    let server = support::postgres_of_its_own();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::ensure(&dir.path().join("pki")).unwrap();
    let other = Pki::ensure(&dir.path().join("other")).unwrap();
    server.serve_tls(&pki, true).await;
    let url = server.admin_url();

    // Without TLS: refused by the database.
    let refused = connect(&format!("{url}?sslmode=disable"))
        .await
        .map(|_| ())
        .expect_err("a connection without TLS is refused");
    assert!(refused.contains("no encryption"), "{refused}");

    // Verified against the CA that signed the server: connected, encrypted, and it works.
    let store = connect(&verify_full(&url, &pki.dir.join("ca.crt")))
        .await
        .unwrap_or_else(|e| panic!("verify-full against the server's CA: {e}"));
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    store.migrate().await.unwrap();

    // A server whose certificate another CA signed: refused before a word is sent.
    let forged = connect(&verify_full(&url, &other.dir.join("ca.crt"))).await;
    let refused = forged
        .map(|_| ())
        .expect_err("a certificate of another CA is refused");
    assert!(
        refused.to_lowercase().contains("certificate"),
        "the error names the certificate: {refused}"
    );
}

/// The chart's way (`database.caSecret`): the URL as it is, `PGSSLMODE=verify-full` and
/// `PGSSLROOTCERT` in the environment of the operator's own binary — its migration succeeds
/// against the server's CA and is refused against another.
#[tokio::test]
async fn the_binary_verifies_the_database_as_the_chart_configures_it() {
    let server = support::postgres_of_its_own();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::ensure(&dir.path().join("pki")).unwrap();
    let other = Pki::ensure(&dir.path().join("other")).unwrap();
    server.serve_tls(&pki, true).await;
    let migrate = |ca: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_voucher-operator"))
            .arg("migrate")
            .env("DATABASE_URL", server.admin_url())
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", ca)
            .output()
            .unwrap()
    };
    let ok = migrate(&pki.dir.join("ca.crt"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let forged = migrate(&other.dir.join("ca.crt"));
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(
        !forged.status.success() && stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
}
