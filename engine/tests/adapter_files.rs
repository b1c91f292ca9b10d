//! Adapter directories whose files are not regular files: a link to `/dev/zero` or a FIFO is
//! refused by `AdapterKey::of` and `LoraAdapter::load` at once, without reading (a read would
//! never end, or block forever).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::tiny;
use tessera_engine::lora::{AdapterKey, LoraAdapter};

fn fifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

/// Replaces one file of an adapter directory.
type Damage = fn(&Path);

#[test]
fn devices_and_fifos_in_an_adapter_are_refused_without_reading() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny::write_model(&dir.path().join("model"), 1);
    let config = tessera_engine::loader::read_config(&model).unwrap();
    let good = tiny::write_adapter(&dir.path().join("good"), 4, 8.0, &["q_proj"], 1);
    assert!(LoraAdapter::load(&good, &config).is_ok());

    let cases: [(&str, Damage); 3] = [
        ("zero-weights", |d| {
            std::os::unix::fs::symlink("/dev/zero", d.join("adapter_model.safetensors")).unwrap()
        }),
        ("fifo-weights", |d| {
            fifo(&d.join("adapter_model.safetensors"))
        }),
        ("fifo-config", |d| {
            std::fs::remove_file(d.join("adapter_config.json")).unwrap();
            fifo(&d.join("adapter_config.json"));
        }),
    ];
    for (name, damage) in cases {
        let d = dir.path().join(name);
        tiny::write_adapter(&d, 4, 8.0, &["q_proj"], 1);
        if name != "fifo-config" {
            std::fs::remove_file(d.join("adapter_model.safetensors")).unwrap();
        }
        damage(&d);
        let t0 = Instant::now();
        let e = AdapterKey::of(&d).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{name}: {e}");
        let e = LoraAdapter::load(&d, &config).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{name}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{name}");
    }
}
