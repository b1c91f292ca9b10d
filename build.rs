include!("engine/build.rs");
