//! A USB stick's FAT filesystem, read and written in user space (the `fatfs` crate) on the block
//! device or image itself: the daemon needs no mount privileges and the kernel no vfat driver.
//!
//! Files are replaced the safe way for a stick that can be pulled at any moment (FAT has no
//! atomic rename-over): the new content goes to `NAME.new` and is flushed (fsync of the block
//! device); then `NAME` becomes `NAME.old`, `NAME.new` becomes `NAME`, `NAME.old` goes, each step
//! flushed. A pull at any point leaves a complete copy, old or new, under one of those names;
//! never a torn file.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use fatfs::{Date, DateTime, FileSystem, FsOptions, Time, TimeProvider};

/// Most bytes read from one stick in one run. A legitimate run reads a few hundred KiB (the
/// request, directories, the FAT for the free space); a crafted stick whose directory clusters
/// form a loop would otherwise keep fatfs reading forever.
const MAX_READ_BYTES: u64 = 128 * 1024 * 1024;
/// Longest a run may take on one stick (the same loop, read slowly).
const TIME_LIMIT: Duration = Duration::from_secs(60);

/// A block device or image file whose `flush` reaches the medium (fsync), with a read budget
/// and a time limit: past either, every read fails and the run ends with that error.
#[derive(Debug)]
pub struct Disk {
    file: File,
    read: u64,
    deadline: Instant,
}

impl Disk {
    pub(crate) fn new(file: File) -> Disk {
        Disk::with_time_limit(file, TIME_LIMIT)
    }

    pub fn with_time_limit(file: File, limit: Duration) -> Disk {
        Disk {
            file,
            read: 0,
            deadline: Instant::now() + limit,
        }
    }
}

impl Read for Disk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read > MAX_READ_BYTES {
            return Err(io::Error::other(format!(
                "read more than {MAX_READ_BYTES} bytes from the stick (a damaged or crafted filesystem?)"
            )));
        }
        if Instant::now() > self.deadline {
            return Err(io::Error::other(
                "gave up on the stick: reading it took too long (a damaged or crafted filesystem?)",
            ));
        }
        let n = self.file.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Write for Disk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Seek for Disk {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

/// File times in UTC (fatfs' default without chrono is 1980).
#[derive(Debug)]
struct UtcClock;

impl TimeProvider for UtcClock {
    fn get_current_date(&self) -> Date {
        self.get_current_date_time().date
    }
    fn get_current_date_time(&self) -> DateTime {
        let now = time::OffsetDateTime::now_utc();
        DateTime {
            date: Date {
                // FAT dates run from 1980 to 2107.
                year: now.year().clamp(1980, 2107) as u16,
                month: now.month() as u16,
                day: now.day() as u16,
            },
            time: Time {
                hour: now.hour() as u16,
                min: now.minute() as u16,
                sec: now.second() as u16,
                millis: now.millisecond(),
            },
        }
    }
}

static UTC: UtcClock = UtcClock;

/// What can go wrong on a stick, as the result file and the journal say it.
#[derive(Debug, thiserror::Error)]
pub enum StickError {
    #[error("not a FAT filesystem ({0}); format the stick as FAT32 (mkfs.vfat) or use another one")]
    NotFat(io::Error),
    #[error("{path} is {size} bytes or more; at most {max} bytes are read")]
    TooBig { path: String, size: u64, max: usize },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

fn io_err(path: &str) -> impl FnOnce(io::Error) -> StickError + '_ {
    move |source| StickError::Io {
        path: path.to_string(),
        source,
    }
}

/// An opened FAT filesystem.
pub(crate) struct Stick<D: Read + Write + Seek> {
    fs: FileSystem<D>,
}

impl<D: Read + Write + Seek> Stick<D> {
    /// Reads the boot sector; anything that is not FAT12/16/32 is [`StickError::NotFat`].
    pub(crate) fn open(disk: D) -> Result<Stick<D>, StickError> {
        let fs = FileSystem::new(disk, FsOptions::new().time_provider(&UTC))
            .map_err(StickError::NotFat)?;
        Ok(Stick { fs })
    }

    /// The volume label (for logs), trimmed.
    pub(crate) fn label(&self) -> String {
        self.fs.volume_label().trim().to_string()
    }

    pub(crate) fn volume_id(&self) -> u32 {
        self.fs.volume_id()
    }

    /// Free bytes on the filesystem.
    pub(crate) fn free_bytes(&self) -> io::Result<u64> {
        let st = self.fs.stats()?;
        Ok(st.free_clusters() as u64 * st.cluster_size() as u64)
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        self.fs.cluster_size() as u64
    }

    /// Reads `path` (at most `max` bytes); `None` when it does not exist.
    pub(crate) fn read(&self, path: &str, max: usize) -> Result<Option<Vec<u8>>, StickError> {
        let mut f = match self.fs.root_dir().open_file(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut buf = Vec::new();
        (&mut f)
            .take(max as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(io_err(path))?;
        if buf.len() > max {
            return Err(StickError::TooBig {
                path: path.to_string(),
                size: buf.len() as u64,
                max,
            });
        }
        Ok(Some(buf))
    }

    /// Creates directory `path` and its parents (existing ones are fine).
    pub(crate) fn create_dirs(&self, path: &str) -> Result<(), StickError> {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.fs.root_dir().create_dir(&at).map_err(io_err(path))?;
        }
        Ok(())
    }

    /// Replaces `path` with `data` (see the module docs for the order of steps).
    pub(crate) fn write_replace(&self, path: &str, data: &[u8]) -> Result<(), StickError> {
        let root = self.fs.root_dir();
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (Some(d), n),
            None => (None, path),
        };
        let parent = match dir {
            Some(d) => root.open_dir(d).map_err(io_err(d))?,
            None => root.clone(),
        };
        let new = format!("{name}.new");
        let old = format!("{name}.old");
        let gone_ok = |r: io::Result<()>, what: &str| match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(what)(e)),
            _ => Ok(()),
        };
        // Leftovers of an earlier run that was cut short.
        gone_ok(parent.remove(&new), &new)?;
        {
            let mut f = parent.create_file(&new).map_err(io_err(&new))?;
            f.truncate().map_err(io_err(&new))?;
            f.write_all(data).map_err(io_err(&new))?;
            f.flush().map_err(io_err(&new))?;
        }
        let exists = parent.open_file(name).is_ok();
        if exists {
            gone_ok(parent.remove(&old), &old)?;
            parent.rename(name, &parent, &old).map_err(io_err(path))?;
        }
        parent.rename(&new, &parent, name).map_err(io_err(path))?;
        gone_ok(parent.remove(&old), &old)?;
        // fatfs has no handle on the disk; a file's flush reaches it (fsync).
        parent
            .open_file(name)
            .and_then(|mut f| f.flush())
            .map_err(io_err(path))
    }

    /// Unmounts cleanly (FSInfo written, dirty flag cleared) and flushes.
    pub(crate) fn close(self) -> io::Result<()> {
        self.fs.unmount()
    }
}
