//! Checking the images after a run: fio's verify headers record the offset each block was
//! written for; a block found elsewhere is misplaced. The standby is compared block by block.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::Result;

#[derive(Debug, Clone, Default)]
pub struct Check {
    pub config: String,
    pub header_blocks: u64,
    pub misplaced: u64,
    /// None: no standby in this configuration.
    pub standby_blocks_checked: Option<u64>,
    pub standby_differs: u64,
    pub standby_misplaced: u64,
}

const BS: usize = 4096;

/// (blocks with a verify header, of which misplaced) for one 4 KiB block.
fn header_at(block: &[u8], offset: u64) -> (bool, bool) {
    let magic = u16::from_le_bytes([block[0], block[1]]);
    let vtype = u16::from_le_bytes([block[2], block[3]]);
    let len = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    if magic != 0xacca || vtype != 5 || len as usize != BS {
        return (false, false);
    }
    let off = u64::from_le_bytes(block[16..24].try_into().expect("8 bytes"));
    (true, off != offset)
}

pub fn scan(config: &str, primary: &Path, standby: Option<&Path>) -> Result<Check> {
    let mut c = Check { config: config.into(), ..Default::default() };
    let mut p = File::open(primary)?;
    let mut s = standby.map(File::open).transpose()?;
    let chunk = 32 << 20;
    let mut a = vec![0u8; chunk];
    let mut b = vec![0u8; chunk];
    let mut at = 0u64;
    loop {
        let n = read_full(&mut p, &mut a)?;
        if n == 0 {
            break;
        }
        if let Some(s) = s.as_mut() {
            let m = read_full(s, &mut b[..n])?;
            c.standby_blocks_checked = Some(c.standby_blocks_checked.unwrap_or(0) + (m / BS) as u64);
            for i in (0..n).step_by(BS) {
                let (x, y) = (&a[i..i + BS], &b[i..i + BS]);
                if x != y {
                    c.standby_differs += 1;
                }
                let (h, mis) = header_at(y, at + i as u64);
                if h && mis {
                    c.standby_misplaced += 1;
                }
            }
        }
        for i in (0..n).step_by(BS) {
            let (h, mis) = header_at(&a[i..i + BS], at + i as u64);
            c.header_blocks += u64::from(h);
            c.misplaced += u64::from(mis);
        }
        at += n as u64;
    }
    Ok(c)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

pub fn table(checks: &[Check]) -> String {
    let mut s = String::from(
        "| config | blocks with a verify header | misplaced | standby blocks compared | standby differing | standby misplaced |\n|---|---|---|---|---|---|\n",
    );
    for c in checks {
        let sb = |v: u64| if c.standby_blocks_checked.is_some() { v.to_string() } else { "-".into() };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            c.config,
            c.header_blocks,
            c.misplaced,
            c.standby_blocks_checked.map_or("-".into(), |v| v.to_string()),
            sb(c.standby_differs),
            sb(c.standby_misplaced),
        );
    }
    s
}
