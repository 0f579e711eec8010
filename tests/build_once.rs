//! The quick start's two commands compile each crate once: `cargo run -p kiln-local -- demo`
//! builds kiln-local (and, from the demo, `cargo build -p kiln-runner`), then `cargo run -p
//! kiln-local -- test` builds the whole workspace with its tests. Cargo compiles a dependency
//! again whenever the features it is built with differ, and a one-package build turns on only
//! what that package's tree asks for; `kiln-workspace-hack` asks for the rest. This holds it in
//! step: every (package, features) a one-package build would compile must be one the
//! workspace's build compiles too. Only `cargo tree` runs here, nothing is built.

use std::collections::BTreeSet;

/// Each node of `cargo tree <args>` as `name version|features`.
fn nodes(args: &[&str]) -> BTreeSet<String> {
    let output = kiln_local::cargo_command()
        .arg("tree")
        .args(args)
        .args(["--prefix", "none", "-f", "{p}|{f}"])
        .output()
        .expect("cargo tree");
    assert!(output.status.success(), "cargo tree {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.replace(" (*)", "").replace(" (proc-macro)", ""))
        .filter(|line| !line.trim().is_empty())
        .collect()
}

#[test]
fn the_demos_builds_compile_dependencies_as_the_test_commands_build_does() {
    let workspace = nodes(&["--workspace", "-e", "normal,build,dev"]);
    let mut missing = Vec::new();
    for package in ["kiln-local", "kiln-runner"] {
        for node in nodes(&["-p", package, "-e", "normal,build"]).difference(&workspace) {
            missing.push(format!("{package}: {node}"));
        }
    }
    assert!(
        missing.is_empty(),
        "built with features the workspace build does not use, so compiled twice on a first run; add the \
         workspace's features for these to functions/workspace-hack/Cargo.toml (see `cargo tree --workspace -e \
         normal,build,dev -f '{{p}}|{{f}}' -i <name>`):\n{}",
        missing.join("\n")
    );
}
