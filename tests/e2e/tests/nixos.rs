//! The NixOS module (`nix/module.nix`), evaluated the way NixOS would: nixpkgs' real module
//! system and NixOS' real systemd unit types and unit-file rendering, from the `nix-eval` kit
//! beside the checkout (`../shared/nix-eval`; stand-ins for `pkgs` and the rest of NixOS, see its
//! README), with Debian's `nix-instantiate` (`make nix` installs it). For each scenario in
//! `nix/tests/`:
//! - it evaluates with no failed assertion (the typo scenario too: its mistake is the service's
//!   to find);
//! - the generated TOML passes `--check-config` of the real binaries of this build, and the typo
//!   fails it naming the key;
//! - every flag of every `ExecStart` exists in that binary's `--help`;
//! - `systemd-analyze security --offline=yes` rates the rendered unit files within the targets
//!   (gateway, registry, MCP and the init unit ≤ 2.0, scheduler ≤ 3.0, backend manager ≤ 4.0);
//! - GPU, Ollama, secrets, firewall and the CLI's stack file come out as documented.
//!
//! Every `.nix` file of the repository passes `nix-instantiate --parse`. Where `nix-instantiate`,
//! the kit or `systemd-analyze` is missing the checks are SKIPPED with a warning on stderr.
//! What this cannot check (the package build, units starting): the VM test in `nix/tests/vm.nix`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use securellm_testkit::{binary, workspace_root};
use serde_json::Value;

const SCENARIOS: &[&str] = &["minimal", "gpu", "ollama", "full", "typo"];

/// Exposure targets of `systemd-analyze security` (lower is better), by unit.
const TARGETS: &[(&str, f64)] = &[
    ("securellm-gateway", 2.0),
    ("securellm-registry", 2.0),
    ("securellm-mcp", 2.0),
    ("securellm-init", 2.0),
    ("securellm-vram-scheduler", 3.0),
    ("securellm-backend-manager", 4.0),
];

fn skip(what: &str) {
    eprintln!("WARNING: SKIPPED the NixOS module checks: {what}");
}

/// The `nix-eval` kit: `$SECURELLM_NIX_EVAL`, else `shared/nix-eval` beside the checkout (or
/// beside its parent).
fn kit() -> Option<PathBuf> {
    let root = workspace_root();
    std::env::var_os("SECURELLM_NIX_EVAL")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            root.join("../shared/nix-eval"),
            root.join("../../shared/nix-eval"),
            PathBuf::from("/work/shared/nix-eval"),
        ])
        .find(|p| p.join("eval.nix").is_file())
}

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The kit when it and `nix-instantiate` are here; else a loud skip.
fn ready() -> Option<PathBuf> {
    if !have("nix-instantiate") {
        skip("nix-instantiate is not installed (`make nix` installs Debian's nix-bin)");
        return None;
    }
    let k = kit();
    if k.is_none() {
        skip("the nix-eval kit (../shared/nix-eval, or $SECURELLM_NIX_EVAL) is not here");
    }
    k
}

/// Evaluate `attr` of `scenario` (`nix/tests/<scenario>.nix`) with the kit, as JSON.
fn eval(kit: &Path, scenario: &str, attr: &str) -> Value {
    let config = workspace_root().join(format!("nix/tests/{scenario}.nix"));
    eval_config(kit, &config, scenario == "gpu", attr)
}

/// Evaluate `attr` of the configuration in `config` with the kit, as JSON.
fn eval_config(kit: &Path, config: &Path, cuda: bool, attr: &str) -> Value {
    let scenario = config.display();
    let nix = workspace_root().join("nix");
    let modules = format!(
        "[ {} {} ]",
        nix.join("module.nix").display(),
        nix.join("tests/eval/nixos-options.nix").display()
    );
    let out = Command::new("nix-instantiate")
        .args(["--store", "dummy://", "--eval", "--strict", "--json"])
        .arg(kit.join("eval.nix"))
        .args(["--arg", "module", &modules])
        .arg("--arg")
        .arg("config")
        .arg(config)
        .arg("--arg")
        .arg("pkgsExtra")
        .arg(nix.join("tests/eval/pkgs-extra.nix"))
        .args(["--arg", "cudaSupport"])
        .arg(if cuda { "true" } else { "false" })
        .args(["-A", attr])
        .output()
        .expect("run nix-instantiate");
    assert!(
        out.status.success(),
        "scenario {scenario}: evaluating {attr} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nix-instantiate --json output")
}

/// The words of a command line as `lib.escapeShellArgs` writes it (single quotes, `'\''`).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    cur.push(q);
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

fn units(kit: &Path, scenario: &str) -> BTreeMap<String, Value> {
    let Value::Object(m) = eval(kit, scenario, "units") else {
        panic!("units is not an attribute set")
    };
    m.into_iter()
        .filter(|(k, _)| k.starts_with("securellm-"))
        .collect()
}

fn service_config<'a>(units: &'a BTreeMap<String, Value>, unit: &str) -> &'a Value {
    &units.get(unit).unwrap_or_else(|| panic!("no unit {unit}"))["serviceConfig"]
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

#[test]
fn every_nix_file_parses() {
    if !have("nix-instantiate") {
        skip("nix-instantiate is not installed (`make nix` installs Debian's nix-bin)");
        return;
    }
    let root = workspace_root();
    let out = Command::new("git")
        .args([
            "ls-files",
            "--cached",
            "--others",
            "--exclude-standard",
            "*.nix",
        ])
        .current_dir(&root)
        .output()
        .expect("git ls-files");
    let files: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    for must in [
        "flake.nix",
        "default.nix",
        "nix/module.nix",
        "nix/package.nix",
        "nix/tests/vm.nix",
    ] {
        assert!(files.iter().any(|f| f == must), "{must} missing: {files:?}");
    }
    for f in &files {
        let o = Command::new("nix-instantiate")
            .args(["--parse"])
            .arg(root.join(f))
            .output()
            .expect("nix-instantiate --parse");
        assert!(
            o.status.success(),
            "{f} does not parse:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn scenarios_evaluate_without_failed_assertions() {
    let Some(kit) = ready() else { return };
    for s in SCENARIOS {
        let failed = eval(&kit, s, "failedAssertions");
        assert_eq!(failed, Value::Array(vec![]), "scenario {s}");
        let u = units(&kit, s);
        for unit in [
            "securellm-init",
            "securellm-vram-scheduler",
            "securellm-registry",
            "securellm-backend-manager",
            "securellm-gateway",
        ] {
            assert!(
                u.contains_key(unit),
                "scenario {s}: no {unit}: {:?}",
                u.keys()
            );
        }
        assert_eq!(
            u.contains_key("securellm-mcp"),
            *s == "full",
            "scenario {s}"
        );
    }
}

/// The TOML the units read: `finalSettings` rendered as `pkgs.formats.toml` would.
fn rendered_toml(kit: &Path, scenario: &str, dir: &Path) -> PathBuf {
    let settings = eval(kit, scenario, "config.services.securellm.finalSettings");
    let value: toml::Value = toml::Value::try_from(&settings).expect("settings as TOML");
    let path = dir.join(format!("{scenario}.toml"));
    std::fs::write(&path, toml::to_string(&value).unwrap()).unwrap();
    path
}

#[test]
fn generated_config_passes_the_services_own_check_and_a_typo_fails_it() {
    let Some(kit) = ready() else { return };
    let dir = tempfile::tempdir().unwrap();
    let services = [
        "vram-scheduler",
        "registry",
        "backend-manager",
        "securellm-gateway",
    ];
    for s in SCENARIOS {
        // The module checks the file with each service at build time...
        let build = eval(&kit, s, "config.services.securellm.configFile.buildCommand");
        let build = build.as_str().unwrap();
        for bin in services {
            assert!(
                build.contains(&format!("/bin/{bin} --check-config ")),
                "scenario {s}: the build does not run {bin} --check-config:\n{build}"
            );
        }
        // ...and this build's binaries agree with it.
        let file = rendered_toml(&kit, s, dir.path());
        for bin in services {
            let o = Command::new(binary(bin))
                .arg("--check-config")
                .arg(&file)
                .env_remove("SECURELLM_CONFIG")
                .output()
                .expect("run --check-config");
            let stderr = String::from_utf8_lossy(&o.stderr);
            if *s == "typo" && bin == "vram-scheduler" {
                assert!(!o.status.success(), "the typo passed {bin}");
                assert!(
                    stderr.contains("reserv"),
                    "{bin} does not name the key: {stderr}"
                );
            } else {
                assert!(
                    o.status.success(),
                    "scenario {s}: {bin} --check-config {}:\n{stderr}\n{}",
                    file.display(),
                    std::fs::read_to_string(&file).unwrap()
                );
                assert!(
                    String::from_utf8_lossy(&o.stdout).contains("configuration is valid"),
                    "{bin}"
                );
            }
        }
        // Checking creates nothing: no token, no database beside the file.
        let created: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| !n.ends_with(".toml"))
            .collect();
        assert!(created.is_empty(), "--check-config created {created:?}");
    }
}

#[test]
fn every_exec_start_flag_exists_in_the_binarys_help() {
    let Some(kit) = ready() else { return };
    let mut help: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    for s in SCENARIOS {
        for (unit, v) in units(&kit, s) {
            let exec = v["serviceConfig"]["ExecStart"].as_str().unwrap_or_default();
            let words = shell_words(exec);
            let Some(first) = words.first() else { continue };
            let name = Path::new(first)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            if !first.contains("-securellm-") || !first.contains("/bin/") {
                continue; // the init script
            }
            let text = help.entry(name.clone()).or_insert_with(|| {
                let o = Command::new(binary(&name))
                    .arg("--help")
                    .output()
                    .expect("--help");
                assert!(o.status.success(), "{name} --help");
                String::from_utf8_lossy(&o.stdout).to_string()
            });
            for w in words.iter().skip(1).filter(|w| w.starts_with("--")) {
                let flag = w.split('=').next().unwrap();
                assert!(
                    text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                    "scenario {s}, {unit}: {name} has no {flag}:\n{text}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} flags checked");
}

#[test]
fn systemd_analyze_security_meets_the_targets() {
    let Some(kit) = ready() else { return };
    if !have("systemd-analyze") {
        skip("systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for s in SCENARIOS {
        let Value::Object(texts) = eval(&kit, s, "unitTexts") else {
            panic!("unitTexts")
        };
        for (unit, text) in texts.iter().filter(|(k, _)| k.starts_with("securellm-")) {
            let file = dir.path().join(format!("{unit}.service"));
            std::fs::write(&file, text.as_str().unwrap()).unwrap();
            let o = Command::new("systemd-analyze")
                .args(["security", "--offline=yes", "--no-pager"])
                .arg(&file)
                .output()
                .expect("systemd-analyze");
            let out = String::from_utf8_lossy(&o.stdout);
            let score: f64 = out
                .lines()
                .find_map(|l| l.split("Overall exposure level for ").nth(1))
                .and_then(|l| l.split(": ").nth(1))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| {
                    panic!(
                        "{unit}: no score in:\n{out}\n{}",
                        String::from_utf8_lossy(&o.stderr)
                    )
                });
            let target = TARGETS
                .iter()
                .find(|(u, _)| u == unit)
                .map(|(_, t)| *t)
                .unwrap_or_else(|| panic!("no target for {unit}"));
            report.push(format!("{s}/{unit}: {score} (target ≤ {target})"));
            assert!(
                score <= target,
                "scenario {s}: {unit} scores {score} > {target}:\n{out}"
            );
        }
    }
    eprintln!(
        "systemd-analyze security --offline=yes:\n  {}",
        report.join("\n  ")
    );
}

#[test]
fn gpu_boxes_use_nvml_from_the_driver_and_may_open_only_nvidia_devices() {
    let Some(kit) = ready() else { return };
    let gpu = units(&kit, "gpu");
    let settings = eval(&kit, "gpu", "config.services.securellm.finalSettings");
    assert_eq!(settings["scheduler"]["inventory"], "nvml");
    assert_eq!(settings["scheduler"]["reserve"], "512MiB");
    assert!(
        settings["backend"]["llama_server"]
            .as_str()
            .unwrap()
            .contains("llama-cpp-cuda"),
        "{}",
        settings["backend"]["llama_server"]
    );
    // `settings.gateway.tls = null` removes the key rather than failing the type check.
    assert!(settings["gateway"].get("tls").is_none());
    assert_eq!(
        settings["backend"]["models"]["qwen2.5-coder-7b"]["context"],
        16384
    );
    assert_eq!(settings["backend"]["defaults"]["idle_ttl_ms"], 300000);
    for unit in ["securellm-vram-scheduler", "securellm-backend-manager"] {
        let u = &gpu[unit];
        assert_eq!(
            u["environment"]["LD_LIBRARY_PATH"], "/run/opengl-driver/lib",
            "{unit}"
        );
        let sc = &u["serviceConfig"];
        assert_eq!(sc["PrivateDevices"], false, "{unit}");
        assert_eq!(sc["DevicePolicy"], "closed", "{unit}");
        let allow = strings(&sc["DeviceAllow"]);
        assert!(
            allow.iter().any(|d| d.starts_with("char-nvidiactl")),
            "{unit}: {allow:?}"
        );
        assert!(
            allow.iter().all(|d| d.starts_with("char-nvidia")),
            "{unit}: {allow:?}"
        );
        let groups = strings(&sc["SupplementaryGroups"]);
        assert!(groups.contains(&"video".to_string()), "{unit}: {groups:?}");
    }
    // CUDA needs W+X memory in the engines the manager starts, nowhere else.
    assert_eq!(
        service_config(&gpu, "securellm-backend-manager")["MemoryDenyWriteExecute"],
        false
    );
    assert_eq!(
        service_config(&gpu, "securellm-vram-scheduler")["MemoryDenyWriteExecute"],
        true
    );
    // Missing model roots never fail a unit.
    let ro = strings(&service_config(&gpu, "securellm-registry")["ReadOnlyPaths"]);
    assert_eq!(ro, vec!["-/srv/models", "-/data/missing-is-fine"]);
    // Without a declared GPU: auto inventory, no device at all.
    let minimal = units(&kit, "minimal");
    let settings = eval(&kit, "minimal", "config.services.securellm.finalSettings");
    assert_eq!(settings["scheduler"]["inventory"], "auto");
    for (unit, v) in &minimal {
        if unit != "securellm-init" {
            assert_eq!(v["serviceConfig"]["PrivateDevices"], true, "{unit}");
            assert!(v["environment"].get("LD_LIBRARY_PATH").is_none(), "{unit}");
        }
    }
}

#[test]
fn ollamas_store_is_read_through_its_group_and_its_daemon_is_the_backend() {
    let Some(kit) = ready() else { return };
    let u = units(&kit, "ollama");
    let settings = eval(&kit, "ollama", "config.services.securellm.finalSettings");
    assert_eq!(
        settings["backend"]["ollama"]["url"],
        "http://127.0.0.1:11500"
    );
    let roots = strings(&settings["models"]["roots"]);
    assert_eq!(roots, vec!["/srv/models", "/var/lib/ollama/models"]);
    for unit in ["securellm-registry", "securellm-backend-manager"] {
        let sc = service_config(&u, unit);
        assert!(
            strings(&sc["SupplementaryGroups"]).contains(&"ollama".to_string()),
            "{unit}"
        );
        assert!(
            strings(&sc["ReadOnlyPaths"]).contains(&"-/var/lib/ollama/models".to_string()),
            "{unit}"
        );
    }
    assert_eq!(
        eval(&kit, "ollama", "config.services.ollama.user"),
        "ollama"
    );
    assert_eq!(
        eval(
            &kit,
            "ollama",
            "config.systemd.services.ollama.serviceConfig.UMask"
        ),
        "0027"
    );
}

#[test]
fn secrets_stay_out_of_the_store_and_only_the_http_port_opens() {
    let Some(kit) = ready() else { return };
    let u = units(&kit, "full");
    let settings = eval(&kit, "full", "config.services.securellm.finalSettings");
    let text = settings.to_string();
    // The TOML (in the store) names only the credentials directory, never the secret files.
    assert!(!text.contains("/run/keys"), "{text}");
    let gw = service_config(&u, "securellm-gateway");
    let creds = strings(&gw["LoadCredential"]);
    for (name, path) in [
        ("tls-cert", "/run/keys/securellm/tls.crt"),
        ("tls-key", "/run/keys/securellm/tls.key"),
        ("jwt-public-key", "/run/keys/securellm/jwt.pub"),
        ("upstream-openai-key", "/run/keys/securellm/openai"),
        ("internal-token", "/var/lib/securellm/internal-token"),
        ("admin-token", "/var/lib/securellm/admin-token"),
    ] {
        assert!(
            creds.contains(&format!("{name}:{path}")),
            "{name}: {creds:?}"
        );
    }
    assert_eq!(
        settings["gateway"]["tls"]["key_file"],
        "/run/credentials/securellm-gateway.service/tls-key"
    );
    assert_eq!(
        settings["gateway"]["upstreams"]["openai"]["api_key_file"],
        "/run/credentials/securellm-gateway.service/upstream-openai-key"
    );
    // The other units get only the internal token.
    for unit in [
        "securellm-vram-scheduler",
        "securellm-registry",
        "securellm-backend-manager",
    ] {
        assert_eq!(
            strings(&service_config(&u, unit)["LoadCredential"]),
            vec!["internal-token:/var/lib/securellm/internal-token"],
            "{unit}"
        );
    }
    // A gateway on the network with cloud upstreams cannot be IP-fenced; the others are.
    assert!(gw.get("IPAddressDeny").is_none());
    assert_eq!(
        service_config(&u, "securellm-registry")["IPAddressDeny"],
        "any"
    );
    assert_eq!(
        eval(&kit, "full", "config.networking.firewall.allowedTCPPorts"),
        serde_json::json!([8443])
    );
    assert_eq!(
        eval(
            &kit,
            "minimal",
            "config.networking.firewall.allowedTCPPorts"
        ),
        serde_json::json!([])
    );
    // A secret given as a store path is refused by an assertion.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.nix");
    std::fs::write(
        &bad,
        "{ services.securellm = { enable = true; gateway.upstreams.x = { baseUrl = \"https://x\"; \
         models = [ \"x\" ]; apiKeyFile = \"/nix/store/aaaa-key\"; }; }; }",
    )
    .unwrap();
    let failed = eval_config(&kit, &bad, false, "failedAssertions");
    assert!(
        failed.to_string().contains("outside the Nix store"),
        "{failed}"
    );
}

#[test]
fn the_cli_finds_the_system_units_through_the_stack_file() {
    let Some(kit) = ready() else { return };
    let stack = eval(
        &kit,
        "full",
        "config.environment.etc.\"securellm/stack\".text",
    );
    let stack = stack.as_str().unwrap();
    for line in [
        "SECURELLM_DATA_DIR=/var/lib/securellm",
        "SECURELLM_INTERNAL_TOKEN_FILE=/var/lib/securellm/internal-token",
        "SECURELLM_SCHEDULER=127.0.0.1:50051",
        "SECURELLM_GATEWAY=127.0.0.1:50054",
        // 0.0.0.0 is where it listens; a local client connects to loopback.
        "SECURELLM_GATEWAY_HTTP=127.0.0.1:8443",
        "SECURELLM_GATEWAY_METRICS=127.0.0.1:9454",
    ] {
        assert!(stack.lines().any(|l| l == line), "{line} missing:\n{stack}");
    }
    let packages = eval(&kit, "minimal", "config.environment.systemPackages");
    assert!(
        packages.to_string().contains("-securellm-0.1.0"),
        "{packages}"
    );
}

/// `--check-config FILE` of each service, without Nix: valid → exit 0 and "valid" on stdout;
/// a bad key, a bad value, an unknown section or an unreadable file → exit 1 naming it; nothing
/// is created (no internal token, no data directory under $HOME).
#[test]
fn check_config_validates_without_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = write(
        "good.toml",
        "[scheduler]\nreserve = \"1GiB\"\n[registry]\nwatch = true\n[models]\nroots = [\"/nope\"]\n\
         [backend.defaults]\nidle_ttl_ms = 1000\n[gateway]\nmax_tokens_cap = 100\n\
         [telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n",
    );
    let cases: &[(&str, &str, &str)] = &[
        (
            "vram-scheduler",
            "[scheduler]\nmax_ttl_ms = 0\n",
            "scheduler.max_ttl_ms",
        ),
        ("registry", "[registry]\nwatchh = true\n", "watchh"),
        (
            "backend-manager",
            "[backend]\nthreads = 0\n",
            "backend.threads",
        ),
        (
            "securellm-gateway",
            "[gateway.jwt]\nalgorithm = \"none\"\n",
            "gateway.jwt.algorithm",
        ),
        (
            "securellm-gateway",
            "[gateway.upstreams.x]\nbase_url = \"ftp://x\"\nmodels = [\"m\"]\n",
            "gateway.upstreams.x",
        ),
        (
            "registry",
            "[telemetry]\notlp_endpoint = \"https://c:4317\"\n",
            "otlp_endpoint",
        ),
        ("vram-scheduler", "[schedulr]\n", "schedulr"),
    ];
    let run = |bin: &str, file: &Path| {
        Command::new(binary(bin))
            .arg("--check-config")
            .arg(file)
            .env("HOME", &home)
            .env_remove("XDG_DATA_HOME")
            .env_remove("SECURELLM_CONFIG")
            .env_remove("SECURELLM_DATA_DIR")
            .output()
            .expect("run --check-config")
    };
    for bin in [
        "vram-scheduler",
        "registry",
        "backend-manager",
        "securellm-gateway",
    ] {
        let o = run(bin, &good);
        assert!(
            o.status.success(),
            "{bin}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(String::from_utf8_lossy(&o.stdout).contains("configuration is valid"));
        let o = run(bin, &dir.path().join("missing.toml"));
        assert_eq!(o.status.code(), Some(1), "{bin}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("missing.toml"),
            "{bin}"
        );
    }
    for (i, (bin, text, names)) in cases.iter().enumerate() {
        let f = write(&format!("bad{i}.toml"), text);
        let o = run(bin, &f);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{bin} accepted {text:?}: {stderr}"
        );
        assert!(
            stderr.contains(names),
            "{bin}: {text:?}: {stderr} does not name {names}"
        );
    }
    let created: Vec<_> = walk(&home);
    assert!(created.is_empty(), "--check-config created {created:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
