//! The physical floor for `bench/run`: the least work any tool must do for
//! a workload, measured on the same disk. Prints the measured section's
//! time in microseconds (the bench adds the cost of starting a process).
//!
//! ```text
//! disk_floor noop                 nothing (the bench times the exec itself)
//! disk_floor write SRC DST        write SRC's files as new files under DST:
//!                                 create+write each, syncfs, rename each,
//!                                 syncfs (the least an atomic, durable apply
//!                                 needs: data durable before the switch,
//!                                 the switch durable after it)
//! disk_floor stat DIR             lstat every file in DIR (the least a
//!                                 no-op check needs to notice a change)
//! disk_floor update DIR FILE      stat every file in DIR, then replace FILE
//!                                 the same durable way (one changed file)
//! ```

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&p, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

fn syncfs(dir: &Path) {
    let d = fs::File::open(dir).expect("open dir for syncfs");
    nix::unistd::syncfs(&d).expect("syncfs");
}

fn write_new(path: &Path, bytes: &[u8]) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().expect("file name"));
    name.push(".floor-tmp");
    let tmp = path.with_file_name(name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .expect("create temp file");
    f.write_all(bytes).expect("write");
    tmp
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).expect("missing argument") };
    let micros = match arg(0) {
        "noop" => 0,
        "write" => {
            let (src, dst) = (Path::new(arg(1)), Path::new(arg(2)));
            let mut files = Vec::new();
            files_under(src, &mut files);
            let contents: Vec<(PathBuf, Vec<u8>)> = files
                .iter()
                .map(|f| {
                    let rel = f.strip_prefix(src).expect("under src");
                    (dst.join(rel), fs::read(f).expect("read source"))
                })
                .collect();
            let start = Instant::now();
            let mut staged = Vec::new();
            for (target, bytes) in &contents {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).expect("create parent");
                }
                staged.push((write_new(target, bytes), target));
            }
            syncfs(dst);
            for (tmp, target) in &staged {
                fs::rename(tmp, target).expect("rename");
            }
            syncfs(dst);
            start.elapsed().as_micros()
        }
        "stat" => {
            let mut files = Vec::new();
            files_under(Path::new(arg(1)), &mut files);
            let start = Instant::now();
            for f in &files {
                nix::sys::stat::lstat(f).expect("lstat");
            }
            start.elapsed().as_micros()
        }
        "update" => {
            let dir = Path::new(arg(1));
            let target = PathBuf::from(arg(2));
            let mut files = Vec::new();
            files_under(dir, &mut files);
            let mut bytes = fs::read(&target).expect("read target");
            bytes.extend_from_slice(b"# floor\n");
            let start = Instant::now();
            for f in &files {
                nix::sys::stat::lstat(f).expect("lstat");
            }
            let tmp = write_new(&target, &bytes);
            syncfs(dir);
            fs::rename(&tmp, &target).expect("rename");
            syncfs(dir);
            start.elapsed().as_micros()
        }
        other => {
            eprintln!("disk_floor: unknown mode {other:?} (noop, write, stat, update)");
            std::process::exit(2);
        }
    };
    println!("{micros}");
}
