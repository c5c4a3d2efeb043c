//! The web dashboard (`/ui` on the gateway's HTTP port) in a real browser: Debian's `chromium` and
//! `chromium-driver` driven by `selenium` (PyPI, `tests/dashboard.py`) against the whole stack (four
//! processes, the real llama-server): only the login without a token, a wrong token refused, the
//! GPU after the login, a load through the API visible as a lease and a model within 2 s, a key
//! created and revoked in the page, no console errors. Screenshots: `target/test-artifacts/dashboard/`.
//! Also the headers every `/ui` answer carries (CSP with `frame-ancestors 'none'`, no framing).
//! Skips LOUDLY only when chromium, chromedriver or selenium is missing (`make chromium`,
//! `make pyenv`).

use std::path::PathBuf;

use securellm_e2e::Stack;

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_stack_and_manages_keys_in_a_real_browser() {
    let python = securellm_testkit::python();
    let selenium = std::process::Command::new(&python)
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|o| o.status.success());
    let (Some(chromium), Some(driver), true) =
        (on_path("chromium"), on_path("chromedriver"), selenium)
    else {
        eprintln!(
            "WARNING: SKIPPED: chromium, chromedriver (make chromium) or selenium beside {} (make \
             pyenv) is missing: the dashboard was NOT tested in a browser",
            python.display()
        );
        return;
    };
    let s = Stack::start(Default::default()).await;
    let base = format!("http://{}", s.gateway.http.unwrap());

    // The page and its assets: strict headers, no framing, no caching; the page names no secret.
    for path in ["/ui", "/ui/app.js", "/ui/app.css"] {
        let r = s.http().get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-store");
    }

    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-artifacts/dashboard");
    let out = tokio::process::Command::new(&python)
        .arg(securellm_e2e::script("dashboard.py"))
        .env("BASE", &base)
        .env("ADMIN_TOKEN", &s.admin_token)
        .env("ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .env("CHROMEDRIVER", &driver)
        .current_dir(s.root())
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the selenium script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "dashboard.py failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.logs(30)
    );
    eprintln!("{stdout}screenshots in {}", artifacts.display());
    for shot in ["login.png", "dashboard.png", "dashboard-after.png"] {
        assert!(artifacts.join(shot).is_file(), "{shot}");
    }

    // Every call the page made went through the management API and was audited as such.
    let rows = s.audit_rows().await;
    assert!(
        rows.iter()
            .any(|r| r.endpoint == "DELETE /admin/v1/keys/{id}" && r.status == 200),
        "the page's revoke is audited"
    );
}
