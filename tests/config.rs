//! Configuration layering: file < environment < CLI, and unknown keys or bad values rejected with
//! the key's name.

use std::path::PathBuf;

use tessera::config::{Config, ConfigError, Sources};

fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tessera.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn file_overrides_defaults() {
    let (_d, path) = file("[server]\nport = 9100\n[resources]\ntraining_gpu_fraction = 0.3\n");
    let c = Config::load(&Sources {
        file: Some(path),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.server.port, 9100);
    assert_eq!(c.resources.training_gpu_fraction, 0.3);
    assert_eq!(
        c.resources.inference_gpu_fraction, 0.6,
        "untouched keys keep their default"
    );
}

#[test]
fn env_wins_over_file_and_cli_wins_over_env() {
    let (_d, path) =
        file("[server]\nport = 9100\nbind = \"0.0.0.0\"\nauth_token = \"t\"\n[batching]\nmax_batch_size = 4\n");
    let sources = Sources {
        file: Some(path),
        env: env(&[
            ("TESSERA_SERVER_PORT", "9200"),
            ("TESSERA_BATCHING_MAX_BATCH_SIZE", "8"),
            ("TESSERA_CACHE", "/tmp/not-a-setting"),
            ("PATH", "/usr/bin"),
        ]),
        cli: vec!["server.port=9300".into()],
    };
    let c = Config::load(&sources).unwrap();
    assert_eq!(c.server.port, 9300, "CLI beats environment");
    assert_eq!(c.batching.max_batch_size, 8, "environment beats file");
    assert_eq!(c.server.bind, "0.0.0.0", "file beats defaults");
}

#[test]
fn a_non_loopback_bind_needs_a_token_unless_explicitly_open() {
    let load = |cli: &[&str]| {
        Config::load(&Sources {
            cli: cli.iter().map(|s| s.to_string()).collect(),
            ..Sources::default()
        })
    };
    let e = load(&["server.bind=\"0.0.0.0\""]).unwrap_err();
    assert!(e.to_string().contains("server.auth_token"), "{e}");
    load(&["server.bind=\"0.0.0.0\"", "server.auth_token=\"x\""]).unwrap();
    load(&[
        "server.bind=\"0.0.0.0\"",
        "server.allow_unauthenticated=true",
    ])
    .unwrap();
    load(&["server.bind=\"127.0.0.1\""]).unwrap();
}

#[test]
fn the_default_cookie_is_refused_off_loopback_and_tls_needs_all_three_files() {
    let load = |cli: &[&str]| {
        Config::load(&Sources {
            cli: cli.iter().map(|s| s.to_string()).collect(),
            ..Sources::default()
        })
    };
    let e = load(&["cluster.bind=\"0.0.0.0\""]).unwrap_err();
    assert!(e.to_string().contains("cluster.cookie"), "{e}");
    // Off loopback, plaintext only when asked for.
    let e = load(&["cluster.bind=\"0.0.0.0\"", "cluster.cookie=\"s3cret\""]).unwrap_err();
    assert!(
        e.to_string().contains("cluster.bind") && e.to_string().contains("allow_plaintext"),
        "{e}"
    );
    load(&[
        "cluster.bind=\"0.0.0.0\"",
        "cluster.cookie=\"s3cret\"",
        "cluster.allow_plaintext=true",
    ])
    .unwrap();
    load(&["cluster.bind=\"127.0.0.1\""]).unwrap();
    let e = load(&["cluster.tls_cert=\"a.crt\"", "cluster.tls_ca=\"ca.crt\""]).unwrap_err();
    assert!(e.to_string().contains("cluster.tls_key"), "{e}");
    let e = load(&["cluster.handshake_timeout_secs=0"]).unwrap_err();
    assert!(
        e.to_string().contains("cluster.handshake_timeout_secs"),
        "{e}"
    );
    let e = load(&["cluster.max_connections=0"]).unwrap_err();
    assert!(e.to_string().contains("cluster.max_connections"), "{e}");
}

#[test]
fn unknown_keys_are_rejected_by_name_wherever_they_come_from() {
    let (_d, path) = file("[server]\nprot = 1\n");
    let err = Config::load(&Sources {
        file: Some(path.clone()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "server.prot"));
    let msg = err.to_string();
    assert!(
        msg.contains("server.prot") && msg.contains(&path.display().to_string()),
        "{msg}"
    );

    let (_d, path) = file("[sever]\nport = 1\n");
    let err = Config::load(&Sources {
        file: Some(path),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("sever.port"), "{err}");

    let err = Config::load(&Sources {
        env: env(&[("TESSERA_SERVER_PROT", "1")]),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("server.prot"), "{err}");
    assert!(err.to_string().contains("TESSERA_SERVER_PROT"), "{err}");

    // The closest key is suggested, with its variable's name.
    assert!(
        err.to_string()
            .contains("did you mean `server.port` (TESSERA_SERVER_PORT)?"),
        "{err}"
    );
    let err = Config::load(&Sources {
        env: env(&[("TESSERA_BATCHING_MAX_BATCH_SIZ", "4")]),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("`batching.max_batch_size`"),
        "{err}"
    );

    // A variable with the prefix whose next word is no section is not a setting: ignored (a
    // wrapper script's or a test's variables).
    let c = Config::load(&Sources {
        env: env(&[
            ("TESSERA_NOSUCHSECTION_X", "1"),
            ("TESSERA_TEST_HOOKS", "1"),
            ("TESSERA_WRAPPER_VERSION", "3"),
        ]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(c.server.port, Config::defaults().server.port);

    let err = Config::load(&Sources {
        cli: vec!["model.pth=/x".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("model.pth"), "{err}");
}

#[test]
fn bad_values_name_the_key() {
    let cases: &[(&str, &str)] = &[
        ("server.port=not-a-port", "server.port"),
        ("server.port=70000", "server.port"),
        (
            "resources.inference_gpu_fraction=1.5",
            "resources.inference_gpu_fraction",
        ),
        (
            "resources.training_gpu_fraction=0.5",
            "resources.training_gpu_fraction",
        ),
        ("log.format=xml", "log.format"),
        ("server.bind=localhost:80", "server.bind"),
        ("batching.max_batch_size=0", "batching.max_batch_size"),
        ("batching.max_step_ms=0", "batching.max_step_ms"),
        ("batching.auto_batch_size=maybe", "batching.auto_batch_size"),
        (
            "autoscaling.cold_start_queue=0",
            "autoscaling.cold_start_queue",
        ),
        (
            "resources.host_memory_limit_mb=-1",
            "resources.host_memory_limit_mb",
        ),
        ("deployments.max=0", "deployments.max"),
        ("training.max_dataset_bytes=0", "training.max_dataset_bytes"),
    ];
    for (text, key) in cases {
        let err = Config::load(&Sources {
            cli: vec![text.to_string()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains(key), "{text}: {err}");
    }
    let err = Config::load(&Sources {
        cli: vec!["no-equals-sign".into()],
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, ConfigError::BadOverride { .. }), "{err}");
}
