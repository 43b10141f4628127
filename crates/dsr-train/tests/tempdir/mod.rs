//! A fresh, empty temporary folder per test, shared by the data tests.

use std::fs;
use std::path::PathBuf;

/// A fresh, empty temporary folder for one test (its path), removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<temp>/dsr-<suite>-<pid>-<name>`, emptied first; `name` must be unique within the suite.
    pub fn new(suite: &str, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dsr-{suite}-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// A path inside the folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
