//! ARCHITECTURE.md names files; this fails when one of them is gone, so the
//! page cannot silently rot.

use integration::paths::repo_root;

#[test]
fn every_path_architecture_md_names_exists() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let named: Vec<&str> = text
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|span| !span.contains(' ') && (span.ends_with('/') || span.contains(".rs") || span.ends_with(".md")))
        .collect();
    assert!(named.len() > 10, "expected ARCHITECTURE.md to name its files, found {named:?}");
    let missing: Vec<&&str> = named.iter().filter(|path| !root.join(path).exists()).collect();
    assert!(missing.is_empty(), "ARCHITECTURE.md names paths that do not exist: {missing:?}");
}
