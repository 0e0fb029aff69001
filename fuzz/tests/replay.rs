//! Every file under `seeds/<target>/` and `regressions/<target>/` through
//! its target's checks, on stable: `cargo test --no-default-features`
//! (from `fuzz/`). Passing a directory of fuzzer corpus instead:
//! `IDEM_FUZZ_DIR=corpus cargo test --no-default-features`.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![
        root.join("seeds").join(target),
        root.join("regressions").join(target),
    ];
    if let Ok(extra) = std::env::var("IDEM_FUZZ_DIR") {
        dirs.push(root.join(extra).join(target));
    }
    let mut count = 0;
    let mut failed = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.expect("readable dir").path()).collect();
        files.sort();
        for file in files.into_iter().filter(|f| f.is_file()) {
            let data = std::fs::read(&file).expect("readable file");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(file.display().to_string());
            }
            count += 1;
        }
    }
    assert!(count > 0, "{target}: no input found");
    assert!(
        failed.is_empty(),
        "{target}: {} of {count} inputs fail: {failed:#?}",
        failed.len()
    );
    println!("{target}: {count} inputs");
}

#[test]
fn key() {
    replay("key", idem_fuzz::key);
}

#[test]
fn canonical_json() {
    replay("canonical_json", idem_fuzz::canonical_json);
}

#[test]
fn config() {
    replay("config", idem_fuzz::config);
}

#[test]
fn path() {
    replay("path", idem_fuzz::path);
}
