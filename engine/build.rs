// Links every binary and test of this package against libtorch so that CUDA is seen and the
// binary runs with no `LD_LIBRARY_PATH`. The root package and `actors/` include this same file.
//
// * `torch-sys` (a direct dependency, `links = "tch"`) tells us where libtorch lives through
//   `DEP_TCH_LIBTORCH_LIB`.
// * The linker's `--as-needed` drops `libtorch_cuda` because no symbol of it is referenced; without
//   it libtorch reports CUDA as unavailable. `-Wl,--no-as-needed -ltorch_cuda` keeps it.
// * An rpath to torch's `lib/` makes `target/*/tessera` find `libtorch*.so` by itself.
// * The torch version (from `torch/version.py` beside `lib/`) is recorded for `tessera doctor`.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(lib_dir) = libtorch_lib_dir() else {
        println!(
            "cargo:warning=libtorch lib directory not found: binaries will need LD_LIBRARY_PATH"
        );
        println!("cargo:rustc-env=LIBTORCH_LINKED_VERSION=unknown");
        return;
    };
    let lib = lib_dir.display();
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!(
        "cargo:rustc-env=LIBTORCH_LINKED_VERSION={}",
        torch_version(&lib_dir)
    );
    println!("cargo:rustc-env=LIBTORCH_LINKED_LIB={lib}");
}

fn libtorch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        return Some(PathBuf::from(dir));
    }
    std::env::var("LIBTORCH")
        .ok()
        .map(|root| Path::new(&root).join("lib"))
}

/// `torch/version.py` holds `__version__ = '2.11.0+cu130'` (PyPI layout: `torch/lib` is the lib dir).
fn torch_version(lib_dir: &Path) -> String {
    let file = lib_dir.join("..").join("version.py");
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("__version__ = "))
                .map(|v| v.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
