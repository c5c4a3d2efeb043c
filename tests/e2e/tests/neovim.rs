//! The Neovim plugin (`integrations/neovim`) in headless Neovim (Debian's `neovim`, 0.7) against
//! the whole stack (four processes, the real llama-server): `:checkhealth securellm`, a chat whose
//! answer streams into the buffer, ask about a selection, rewrite a selection, inline completion,
//! `:SecureLLMModels`, cancelling a long answer with the chat buffer's key (the gateway's audit
//! shows 499), a wrong key (the gateway's own message is shown), `:SecureLLMStatus` (the loaded
//! models in a floating window). `tests/neovim_plugin.lua` drives the editor and writes what it
//! saw; this test checks it. Skips LOUDLY only when `nvim` is not installed (`make neovim`).

use std::process::Stdio;
use std::time::Duration;

use securellm_e2e::{ModelSpec, Options, Stack};
use serde_json::Value;

fn nvim() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nvim"))
        .find(|p| p.is_file())
}

fn lines(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("lines: {v}"))
        .iter()
        .map(|l| l.as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_neovim_plugin_chats_streams_cancels_and_shows_the_stack() {
    let Some(nvim) = nvim() else {
        eprintln!(
            "WARNING: SKIPPED: nvim is not installed (make neovim installs Debian's neovim): the \
             Neovim plugin was NOT tested"
        );
        return;
    };
    // The tiny model for answers; a slower one with a long context, so a long answer is still
    // streaming when it is cancelled.
    let s = Stack::start(Options {
        models: vec![ModelSpec::tiny("tiny"), ModelSpec::bigger("big")],
        extra_toml: "[backend.models.big]\ncontext = 2048\n".into(),
        ..Default::default()
    })
    .await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let plugin = root.join("integrations/neovim");
    let script = root.join("tests/e2e/tests/neovim_plugin.lua");
    let result_file = s.root().join("neovim-results.json");
    let wrong = "sk-slm-0000000000000000000000000000000000000000000000000000000000000000";
    let mut cmd = tokio::process::Command::new(&nvim);
    cmd.args(["--headless", "-u", "NONE", "-i", "NONE", "-n"])
        .arg("--cmd")
        .arg(format!("set rtp^={}", plugin.display()))
        .arg("-c")
        .arg(format!("luafile {}", script.display()))
        .env(
            "SECURELLM_URL",
            format!("http://{}", s.gateway.http.unwrap()),
        )
        .env("SECURELLM_API_KEY", &s.api_key)
        .env("SECURELLM_ADMIN_TOKEN", &s.admin_token)
        // No key files of a stack on this machine are read.
        .env("SECURELLM_DATA_DIR", s.root().join("no-such-dir"))
        .env("MODEL", "tiny")
        .env("BIG", "big")
        .env("WRONG_KEY", wrong)
        .env("RESULT_FILE", &result_file)
        .current_dir(s.root())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("nvim finishes within 5 minutes")
        .expect("run nvim");
    let text = std::fs::read_to_string(&result_file).unwrap_or_else(|e| {
        panic!(
            "no results ({e}); nvim exited {:?}\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            s.logs(30)
        )
    });
    let r: Value = serde_json::from_str(&text).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert!(
        r.get("errors").is_none(),
        "scenario errors: {}",
        r["errors"]
    );

    // :checkhealth securellm: everything found, nothing wrong.
    let health = lines(&r["health"]).join("\n");
    assert!(health.contains("OK") && health.contains("curl"), "{health}");
    assert!(
        health.contains("API key from $SECURELLM_API_KEY works"),
        "{health}"
    );
    assert!(!health.contains("ERROR"), "{health}");

    // Chat: the answer arrived in pieces and was in the buffer while the request still ran.
    let chat = &r["chat"];
    assert_eq!(chat["result"]["status"], 200, "{chat}");
    assert!(chat["result"]["events"].as_u64().unwrap() >= 2, "{chat}");
    assert_eq!(chat["seen_partial"], true, "{chat}");
    let answer = chat["result"]["text"].as_str().unwrap();
    assert!(!answer.is_empty());
    let buffer = lines(&chat["buffer"]).join("\n");
    assert!(buffer.contains(answer.trim()), "{buffer}");
    assert!(buffer.contains("## Assistant") && buffer.contains("Say hello."));
    let rows = s.audited(&["nvim-chat"]).await;
    assert_eq!((rows[0].status, rows[0].streamed), (200, true));

    // Ask about a selection: the question and the fenced lines went to the chat, an answer came.
    let ask = &r["ask"];
    assert_eq!(ask["result"]["status"], 200, "{ask}");
    let buffer = lines(&ask["buffer"]).join("\n");
    assert!(
        buffer.contains("What does this return?\n\n```lua\nlocal x = 1\nreturn x + 1\n```"),
        "{buffer}"
    );

    // Rewrite: the two lines were replaced by the answer; the third untouched.
    let rw = &r["rewrite"];
    assert_eq!(rw["result"]["status"], 200, "{rw}");
    let new = lines(&rw["result"]["lines"]);
    let buffer = lines(&rw["buffer"]);
    assert_eq!(buffer.last().unwrap(), "untouched");
    assert_eq!(&buffer[..buffer.len() - 1], &new[..], "{rw}");
    assert_ne!(new, lines(&rw["original"]));

    // Inline completion: shown as virtual text, accepted into the line.
    let c = &r["complete"];
    assert_eq!(c["result"]["status"], 200, "{c}");
    let suggestion = c["result"]["text"].as_str().unwrap();
    let first = suggestion.split('\n').next().unwrap();
    assert_eq!(c["shown"], first, "{c}");
    assert!(
        lines(&c["buffer"])[0].starts_with(&format!("The quick brown{first}")),
        "{c}"
    );

    // :SecureLLMModels offered the models the key may use; the pick became the model.
    let offered = lines(&r["models"]["offered"]);
    assert!(offered.contains(&"tiny".to_string()) && offered.contains(&"big".to_string()));
    assert_eq!(r["models"]["chosen"], "big");

    // Cancel: mid-stream, with the chat buffer's key; the gateway saw the caller leave (499).
    let cancel = &r["cancel"];
    assert!(cancel["events_before"].as_i64().unwrap() >= 2, "{cancel}");
    assert_eq!(cancel["result"]["cancelled"], true, "{cancel}");
    assert!(
        lines(&cancel["buffer_tail"]).contains(&"[cancelled]".to_string()),
        "{cancel}"
    );
    let rows = s.audited(&["nvim-cancel"]).await;
    assert_eq!(rows[0].status, 499, "{:?}", rows[0]);

    // A wrong key: the gateway's own message, in a notification and in the buffer.
    let expected = s
        .post(
            wrong,
            "chat/completions",
            "wrong-direct",
            serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(expected.status, 401);
    let message = expected.error_message().to_string();
    assert!(!message.is_empty());
    let wk = &r["wrong_key"];
    assert_eq!(wk["result"]["status"], 401, "{wk}");
    assert_eq!(wk["result"]["error"], message.as_str(), "{wk}");
    assert!(
        wk["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["msg"].as_str().unwrap_or("").contains(&message)),
        "{wk}"
    );
    assert!(
        lines(&wk["buffer"]).contains(&format!("[error] {message}")),
        "{wk}"
    );

    // :SecureLLMStatus: a floating window listing the loaded models.
    let st = &r["status"];
    assert_eq!(st["floating"], true, "{st}");
    let status = lines(&st["lines"]);
    for model in ["tiny", "big"] {
        assert!(
            status
                .iter()
                .any(|l| l.contains(model) && (l.contains("ready") || l.contains("busy"))),
            "{model} is shown loaded: {status:#?}"
        );
    }
    assert!(status.iter().any(|l| l.contains("GPU 0")), "{status:#?}");
}
