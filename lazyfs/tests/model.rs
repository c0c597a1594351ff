//! coil-lazyfs against a simple model: random, seeded sequences of write,
//! truncate, fsync, create, unlink, rename, directory fsync and power cuts,
//! run on the state machine directly (many seeds) and through a real FUSE
//! mount (fewer, with remounts over the same backing directory).
//!
//! The model: two directories `a` and `b`; each has volatile names and
//! durable names; each file has volatile and durable content. fsync(file)
//! copies its content to durable, fsync(dir) its names, a cut copies
//! durable back to volatile. `COIL_LAZYFS_SEED=N` replays one seed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use coil_lazyfs::core::{Core, Ino, ROOT};
use coil_lazyfs::{CutOptions, Kind, Mount, OpKind, Trip};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DIRS: [&str; 2] = ["a", "b"];
const NAMES: [&str; 4] = ["f0", "f1", "f2", "f3"];

#[derive(Debug, Clone)]
enum Op {
    Write {
        d: usize,
        n: usize,
        off: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        d: usize,
        n: usize,
        len: u64,
    },
    Fsync {
        d: usize,
        n: usize,
    },
    Create {
        d: usize,
        n: usize,
    },
    Unlink {
        d: usize,
        n: usize,
    },
    Rename {
        d: usize,
        from: usize,
        to: usize,
    },
    FsyncDir {
        d: usize,
    },
    Cut,
    Remount,
}

fn gen_op(rng: &mut StdRng) -> Op {
    let d = rng.gen_range(0..DIRS.len());
    let n = rng.gen_range(0..NAMES.len());
    match rng.gen_range(0..100) {
        0..=29 => Op::Write {
            d,
            n,
            off: rng.gen_range(0..600),
            len: rng.gen_range(1..300),
            byte: rng.gen(),
        },
        30..=34 => Op::Truncate {
            d,
            n,
            len: rng.gen_range(0..700),
        },
        35..=49 => Op::Fsync { d, n },
        50..=61 => Op::Create { d, n },
        62..=67 => Op::Unlink { d, n },
        68..=75 => Op::Rename {
            d,
            from: n,
            to: rng.gen_range(0..NAMES.len()),
        },
        76..=89 => Op::FsyncDir { d },
        90..=96 => Op::Cut,
        _ => Op::Remount,
    }
}

/// The model. Files are numbered; names point at them.
#[derive(Debug, Default)]
struct Model {
    next: u32,
    names: [BTreeMap<usize, u32>; 2],
    dnames: [BTreeMap<usize, u32>; 2],
    data: BTreeMap<u32, Vec<u8>>,
    durable: BTreeMap<u32, Vec<u8>>,
}

impl Model {
    /// Applies `op`; false if it must fail (ENOENT, EEXIST).
    fn apply(&mut self, op: &Op) -> bool {
        match *op {
            Op::Write {
                d,
                n,
                off,
                len,
                byte,
            } => {
                let Some(f) = self.names[d].get(&n) else {
                    return false;
                };
                let buf = self.data.entry(*f).or_default();
                let end = off as usize + len;
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                buf[off as usize..end].fill(byte);
            }
            Op::Truncate { d, n, len } => {
                let Some(f) = self.names[d].get(&n) else {
                    return false;
                };
                self.data.entry(*f).or_default().resize(len as usize, 0);
            }
            Op::Fsync { d, n } => {
                let Some(f) = self.names[d].get(&n) else {
                    return false;
                };
                let v = self.data.get(f).cloned().unwrap_or_default();
                self.durable.insert(*f, v);
            }
            Op::Create { d, n } => {
                if self.names[d].contains_key(&n) {
                    return false;
                }
                self.next += 1;
                self.names[d].insert(n, self.next);
                self.data.insert(self.next, Vec::new());
                self.durable.insert(self.next, Vec::new());
            }
            Op::Unlink { d, n } => {
                if self.names[d].remove(&n).is_none() {
                    return false;
                }
            }
            Op::Rename { d, from, to } => {
                let Some(f) = self.names[d].get(&from).copied() else {
                    return false;
                };
                if from != to {
                    self.names[d].remove(&from);
                    self.names[d].insert(to, f);
                }
            }
            Op::FsyncDir { d } => self.dnames[d] = self.names[d].clone(),
            Op::Cut | Op::Remount => {
                // A remount is preceded by a cut.
                self.names = self.dnames.clone();
                self.data = self.durable.clone();
            }
        }
        true
    }

    /// Volatile contents: "dir/name" -> bytes.
    fn view(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for (d, names) in self.names.iter().enumerate() {
            for (n, f) in names {
                out.insert(
                    format!("{}/{}", DIRS[d], NAMES[*n]),
                    self.data.get(f).cloned().unwrap_or_default(),
                );
            }
        }
        out
    }

    fn durable_view(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for (d, names) in self.dnames.iter().enumerate() {
            for (n, f) in names {
                out.insert(
                    format!("{}/{}", DIRS[d], NAMES[*n]),
                    self.durable.get(f).cloned().unwrap_or_default(),
                );
            }
        }
        out
    }
}

fn seeds(default: u64) -> Vec<u64> {
    match std::env::var("COIL_LAZYFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => {
            let base: u64 = rand::thread_rng().gen();
            (0..default).map(|i| base.wrapping_add(i)).collect()
        }
    }
}

fn read_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for d in DIRS {
        let Ok(rd) = std::fs::read_dir(root.join(d)) else {
            continue;
        };
        for e in rd {
            let e = e.expect("dir entry");
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).expect("read");
            out.insert(format!("{d}/{name}"), bytes);
        }
    }
    out
}

// ---- the state machine, directly ---------------------------------------

fn core_dir(core: &Core, d: usize) -> Ino {
    core.lookup(ROOT, DIRS[d].as_bytes()).expect("dir").ino
}

fn core_file(core: &Core, d: usize, n: usize) -> Option<Ino> {
    core.lookup(core_dir(core, d), NAMES[n].as_bytes())
        .ok()
        .map(|a| a.ino)
}

fn core_apply(core: &mut Core, op: &Op) -> bool {
    match *op {
        Op::Write {
            d,
            n,
            off,
            len,
            byte,
        } => match core_file(core, d, n) {
            Some(f) => core.write(f, off, &vec![byte; len]).is_ok(),
            None => false,
        },
        Op::Truncate { d, n, len } => match core_file(core, d, n) {
            Some(f) => core.set_len(f, len).is_ok(),
            None => false,
        },
        Op::Fsync { d, n } => match core_file(core, d, n) {
            Some(f) => core.fsync(f).is_ok(),
            None => false,
        },
        Op::Create { d, n } => {
            let dir = core_dir(core, d);
            core.create(dir, NAMES[n].as_bytes(), Kind::File, 0o600)
                .is_ok()
        }
        Op::Unlink { d, n } => {
            let dir = core_dir(core, d);
            core.remove(dir, NAMES[n].as_bytes(), Kind::File).is_ok()
        }
        Op::Rename { d, from, to } => {
            let dir = core_dir(core, d);
            core.rename(
                dir,
                NAMES[from].as_bytes(),
                dir,
                NAMES[to].as_bytes(),
                false,
            )
            .is_ok()
        }
        Op::FsyncDir { d } => {
            let dir = core_dir(core, d);
            core.fsync(dir).is_ok()
        }
        Op::Cut => {
            core.cut(CutOptions::forget()).expect("cut");
            true
        }
        Op::Remount => {
            core.cut(CutOptions::forget()).expect("cut");
            let backing = core.backing().to_path_buf();
            *core = Core::load(&backing).expect("reload");
            true
        }
    }
}

fn core_view(core: &Core) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (d, dname) in DIRS.iter().enumerate() {
        let dir = core_dir(core, d);
        for (name, ino, _) in core.readdir(dir).expect("readdir") {
            let a = core.attr(ino).expect("attr");
            let bytes = core.read(ino, 0, a.size as usize).expect("read");
            out.insert(format!("{dname}/{}", String::from_utf8_lossy(&name)), bytes);
        }
    }
    out
}

fn setup_core(dir: &Path) -> Core {
    let mut core = Core::load(dir).expect("load");
    for d in DIRS {
        core.create(ROOT, d.as_bytes(), Kind::Dir, 0o700)
            .expect("mkdir");
    }
    core.fsync(ROOT).expect("fsync root");
    core
}

#[test]
fn state_machine_matches_the_model() {
    let started = Instant::now();
    for seed in seeds(300) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut core = setup_core(tmp.path());
        let mut model = Model::default();
        let mut rng = StdRng::seed_from_u64(seed);
        for step in 0..200 {
            let mut op = gen_op(&mut rng);
            if matches!(op, Op::Remount) && rng.gen_bool(0.5) {
                op = Op::Cut;
            }
            let want = model.apply(&op);
            let got = core_apply(&mut core, &op);
            assert_eq!(got, want, "seed {seed} step {step} {op:?}: success");
            assert_eq!(
                core_view(&core),
                model.view(),
                "seed {seed} step {step} after {op:?}"
            );
            if matches!(op, Op::Cut | Op::FsyncDir { .. }) {
                core.check_backing()
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                assert_eq!(
                    read_tree(tmp.path()),
                    model.durable_view(),
                    "seed {seed} step {step}: backing != durable model"
                );
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "too slow");
    }
}

#[test]
fn a_torn_write_keeps_a_prefix_and_says_so() {
    for seed in 0..50u64 {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut core = Core::load(tmp.path()).expect("load");
        let f = core
            .create(ROOT, b"wal", Kind::File, 0o600)
            .expect("create")
            .ino;
        core.fsync(ROOT).expect("fsync dir");
        core.write(f, 0, &[1; 100]).expect("write");
        core.fsync(f).expect("fsync");
        core.write(f, 100, &[2; 50]).expect("write");
        core.write(f, 150, &[3; 80]).expect("write");
        let r = core
            .cut(CutOptions {
                seed,
                keep_prob: 0.0,
                tear_last: true,
            })
            .expect("cut");
        assert_eq!(r.files.len(), 1);
        assert_eq!(r.files[0].dropped_ops, 1, "{r}");
        let (off, kept, len) = r.files[0].torn.expect("torn");
        assert_eq!((off, len), (150, 80));
        let got = std::fs::read(tmp.path().join("wal")).expect("read");
        let mut want = vec![1u8; 100];
        if kept > 0 {
            // The dropped write in between reads back as zeros.
            want.extend([0u8; 50]);
            want.extend(vec![3u8; kept]);
        }
        assert_eq!(got, want, "seed {seed}: {r}");
        let a = core.attr(f).expect("attr");
        assert_eq!(core.read(f, 0, a.size as usize).expect("read"), want);
    }
}

#[test]
fn unsynced_rename_over_is_undone_and_synced_one_is_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut core = Core::load(tmp.path()).expect("load");
    let old = core.create(ROOT, b"CP", Kind::File, 0o600).expect("c").ino;
    core.write(old, 0, b"old").expect("w");
    core.fsync(old).expect("fsync");
    core.fsync(ROOT).expect("fsync dir");
    let tmpf = core
        .create(ROOT, b"CP.tmp", Kind::File, 0o600)
        .expect("c")
        .ino;
    core.write(tmpf, 0, b"new").expect("w");
    core.fsync(tmpf).expect("fsync");
    core.rename(ROOT, b"CP.tmp", ROOT, b"CP", false)
        .expect("rename");
    let r = core.cut(CutOptions::forget()).expect("cut");
    assert_eq!(r.dropped_ns.len(), 2, "{r}");
    assert_eq!(std::fs::read(tmp.path().join("CP")).expect("read"), b"old");
    assert!(!tmp.path().join("CP.tmp").exists());
    // Again, now with the directory synced after the rename.
    let tmpf = core
        .create(ROOT, b"CP.tmp", Kind::File, 0o600)
        .expect("c")
        .ino;
    core.write(tmpf, 0, b"new").expect("w");
    core.fsync(tmpf).expect("fsync");
    core.rename(ROOT, b"CP.tmp", ROOT, b"CP", false)
        .expect("rename");
    core.fsync(ROOT).expect("fsync dir");
    let r = core.cut(CutOptions::forget()).expect("cut");
    assert!(!r.dropped_anything(), "{r}");
    assert_eq!(std::fs::read(tmp.path().join("CP")).expect("read"), b"new");
    core.check_backing().expect("backing");
}

#[test]
fn a_trip_fails_its_operation_and_everything_after_until_the_cut() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut core = Core::load(tmp.path()).expect("load");
    let f = core.create(ROOT, b"x", Kind::File, 0o600).expect("c").ino;
    core.arm(Trip {
        op: OpKind::Fsync,
        path_contains: "/x".into(),
        skip: 1,
    });
    core.write(f, 0, b"1").expect("w");
    core.fsync(f).expect("first fsync is skipped over");
    core.write(f, 1, b"2").expect("w");
    assert_eq!(core.fsync(f), Err(libc::EIO));
    assert_eq!(core.tripped(), Some("Fsync /x"));
    assert_eq!(core.write(f, 2, b"3"), Err(libc::EIO));
    assert!(core.create(ROOT, b"y", Kind::File, 0o600).is_err());
    let r = core.cut(CutOptions::forget()).expect("cut");
    assert_eq!(r.tripped.as_deref(), Some("Fsync /x"));
    // x was never made durable by a directory fsync: gone.
    assert!(core.lookup(ROOT, b"x").is_err());
    assert!(core.create(ROOT, b"y", Kind::File, 0o600).is_ok());
}

// ---- through FUSE -----------------------------------------------------------

fn mount_or_skip(backing: &Path, mnt: &Path) -> Option<Mount> {
    match Mount::new(backing, mnt) {
        Ok(m) => Some(m),
        Err(e) if std::env::var("COIL_REQUIRE_FUSE").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: cannot mount FUSE here ({e}); COIL_REQUIRE_FUSE=1 makes this fail");
            None
        }
        Err(e) => panic!("mount: {e}"),
    }
}

fn fs_apply(root: &Path, op: &Op) -> bool {
    let file = |d: usize, n: usize| root.join(DIRS[d]).join(NAMES[n]);
    match *op {
        Op::Write {
            d,
            n,
            off,
            len,
            byte,
        } => match OpenOptions::new().write(true).open(file(d, n)) {
            Ok(f) => {
                f.write_all_at(&vec![byte; len], off).expect("pwrite");
                true
            }
            Err(_) => false,
        },
        Op::Truncate { d, n, len } => match OpenOptions::new().write(true).open(file(d, n)) {
            Ok(f) => {
                f.set_len(len).expect("ftruncate");
                true
            }
            Err(_) => false,
        },
        Op::Fsync { d, n } => match File::open(file(d, n)) {
            Ok(f) => {
                // fdatasync half of the time: both must persist data and size.
                if n % 2 == 0 {
                    f.sync_data().expect("fdatasync");
                } else {
                    f.sync_all().expect("fsync");
                }
                true
            }
            Err(_) => false,
        },
        Op::Create { d, n } => OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file(d, n))
            .is_ok(),
        Op::Unlink { d, n } => std::fs::remove_file(file(d, n)).is_ok(),
        Op::Rename { d, from, to } => std::fs::rename(file(d, from), file(d, to)).is_ok(),
        Op::FsyncDir { d } => {
            File::open(root.join(DIRS[d]))
                .and_then(|f| f.sync_all())
                .expect("fsync dir");
            true
        }
        Op::Cut | Op::Remount => unreachable!("handled by the caller"),
    }
}

#[test]
fn fuse_mount_matches_the_model() {
    let started = Instant::now();
    for seed in seeds(4) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let backing = tmp.path().join("backing");
        let mut mnt = tmp.path().join("mnt");
        let mut remounts = 0;
        let Some(mut m) = mount_or_skip(&backing, &mnt) else {
            return;
        };
        for d in DIRS {
            std::fs::create_dir(mnt.join(d)).expect("mkdir");
        }
        File::open(&mnt)
            .and_then(|f| f.sync_all())
            .expect("fsync root");
        let mut model = Model::default();
        let mut rng = StdRng::seed_from_u64(seed);
        for step in 0..250 {
            let op = gen_op(&mut rng);
            let want = model.apply(&op);
            match op {
                Op::Cut => {
                    let t = Instant::now();
                    let r = m.cut(CutOptions::forget()).expect("cut");
                    assert!(t.elapsed() < Duration::from_millis(100), "slow cut");
                    let _ = r.to_string();
                }
                Op::Remount => {
                    // Cut, unmount, and serve the same backing directory again.
                    m.cut(CutOptions::forget()).expect("cut");
                    model.apply(&Op::Cut);
                    if let Err(e) = m.unmount() {
                        // Busy: a process another test thread was forking
                        // still held a copy of a descriptor opened in the
                        // mount (seen on a loaded machine). The mount was
                        // detached; serve the backing directory at a fresh
                        // mountpoint, as `detach` says to.
                        assert_eq!(e.kind(), std::io::ErrorKind::ResourceBusy, "unmount: {e}");
                        remounts += 1;
                        mnt = tmp.path().join(format!("mnt{remounts}"));
                        std::fs::create_dir(&mnt).expect("mountpoint");
                    }
                    m = mount_or_skip(&backing, &mnt).expect("remount");
                }
                _ => {
                    let got = fs_apply(&mnt, &op);
                    assert_eq!(got, want, "seed {seed} step {step} {op:?}: success");
                }
            }
            assert_eq!(
                read_tree(&mnt),
                model.view(),
                "seed {seed} step {step} after {op:?}"
            );
            if matches!(op, Op::Cut | Op::Remount | Op::FsyncDir { .. }) {
                assert_eq!(
                    read_tree(&backing),
                    model.durable_view(),
                    "seed {seed} step {step}: backing != durable model"
                );
            }
        }
        drop(m);
        assert!(started.elapsed() < Duration::from_secs(120), "too slow");
    }
}

#[test]
fn the_control_file_cuts_and_reports_within_100ms() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    let Some(m) = mount_or_skip(&backing, &mnt) else {
        return;
    };
    std::fs::write(mnt.join("unsynced"), b"gone").expect("write");
    let ctl = mnt.join(coil_lazyfs::CONTROL_NAME);
    let t = Instant::now();
    std::fs::write(&ctl, b"cut").expect("cut via control file");
    let report = std::fs::read_to_string(&ctl).expect("report");
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert!(report.contains("dropped create /unsynced"), "{report}");
    assert!(!mnt.join("unsynced").exists());
    assert!(std::fs::write(&ctl, b"bogus").is_err());
    drop(m);
    // Dropped: unmounted.
    assert!(!ctl.exists());
}

#[test]
fn a_panic_while_mounted_still_unmounts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let backing = tmp.path().join("backing");
    let mnt = tmp.path().join("mnt");
    if mount_or_skip(&backing, &mnt).is_none() {
        return;
    }
    let mnt2 = mnt.clone();
    let res = std::panic::catch_unwind(move || {
        let _m = Mount::new(&backing, &mnt2).expect("mount");
        std::fs::write(mnt2.join("f"), b"x").expect("write");
        panic!("test panic");
    });
    assert!(res.is_err());
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        !mounts.contains(&*mnt.to_string_lossy()),
        "still mounted after a panic"
    );
}
