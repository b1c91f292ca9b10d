//! The built binary: runs with no LD_LIBRARY_PATH, links libtorch_cuda, and `doctor` reports
//! torch 2.11, the host and the default model.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

#[test]
fn doctor_runs_without_ld_library_path_and_reports_torch() {
    let out = Command::new(BIN)
        .arg("doctor")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("torch (libtorch): 2.11.0"), "{stdout}");
    assert!(stdout.contains("CUDA available:"), "{stdout}");
    assert!(
        stdout.contains("CPU:") && stdout.contains("RAM:"),
        "{stdout}"
    );
    assert!(stdout.contains("inference_gpu_fraction = 0.6"), "{stdout}");
    assert!(stdout.contains("device split: inference ["), "{stdout}");
    assert!(stdout.contains("model: "), "{stdout}");
}

#[test]
fn binary_links_libtorch_cuda_and_cpu_through_its_rpath() {
    let lib = std::path::Path::new(env!("LIBTORCH_LINKED_LIB"));
    let out = Command::new("ldd")
        .arg(BIN)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let ldd = String::from_utf8_lossy(&out.stdout);
    assert!(!ldd.contains("not found"), "{ldd}");
    let resolved = |name: &str| {
        ldd.lines()
            .any(|l| l.contains(name) && l.contains(&lib.join(name).display().to_string()))
    };
    assert!(resolved("libtorch_cpu.so"), "{ldd}");
    if lib.join("libtorch_cuda.so").exists() {
        assert!(resolved("libtorch_cuda.so"), "{ldd}");
    }
}

#[test]
fn unknown_config_key_on_the_command_line_fails_with_its_name() {
    let out = Command::new(BIN)
        .args(["--set", "server.prot=1", "doctor"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.prot"), "{stderr}");
}

#[test]
fn head_flags_reach_the_config() {
    let out = Command::new(BIN)
        .args([
            "doctor",
            "--set",
            "server.port=9123",
            "--log-format",
            "pretty",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("port = 9123"), "{stdout}");
    assert!(stdout.contains("format = \"pretty\""), "{stdout}");
}
