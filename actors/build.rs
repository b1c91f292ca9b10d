include!("../engine/build.rs");
