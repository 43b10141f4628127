//! A pre-scan of the pickle (`data.pkl`) of a PyTorch archive before candle's reader sees it.
//!
//! candle's reader builds a tree of owned objects: a memo lookup copies the whole memoised
//! object, a string's length field is allocated before its bytes are read, and tuples are
//! indexed without checking their length. A pickle of a few hundred bytes can therefore ask for
//! gigabytes (a string length of 4 GiB, or memoised tuples of tuples copied again and again,
//! the "billion laughs" pattern) or nest objects deeply enough to overflow the stack when they
//! are dropped. This scan walks the opcodes candle understands with the same argument sizes and
//! stack effects, but keeps only the size (number of objects) and the nesting depth of every
//! stack entry, and refuses a pickle whose strings run past its end, or that would make more
//! than [`MAX_OBJECTS`] objects or nest deeper than [`MAX_DEPTH`]. Opcodes candle does not know
//! are left for candle to refuse.

use std::collections::HashMap;

/// The most objects (counting every copy a memo lookup makes) a pickle may create. A full DSR
/// state_dict needs about 3 000; an anomalib Lightning checkpoint a few tens of thousands.
pub(crate) const MAX_OBJECTS: u64 = 10_000_000;
/// The deepest nesting of tuples, lists and dictionaries accepted.
pub(crate) const MAX_DEPTH: u32 = 1_000;

/// One stack entry: a mark, or an object with its size and depth.
#[derive(Clone, Copy)]
enum Item {
    Mark,
    Obj { objects: u64, depth: u32 },
}

struct Scan<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, (u64, u32)>,
    made: u64,
}

impl<'a> Scan<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "the pickle ends inside an opcode argument at byte {}",
                self.pos
            )),
        }
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn line(&mut self) -> Result<(), String> {
        match self.bytes[self.pos..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(())
            }
            None => Err("a GLOBAL opcode's name has no end of line".into()),
        }
    }

    /// Pushes an object of `objects` objects in all; `new` of them are created by this opcode
    /// (one for a new container, all of them for a copy out of the memo).
    fn push_made(&mut self, objects: u64, depth: u32, new: u64) -> Result<(), String> {
        self.made = self.made.saturating_add(new);
        if self.made > MAX_OBJECTS {
            return Err(format!(
                "the pickle would build more than {MAX_OBJECTS} objects (a pickle bomb?)"
            ));
        }
        if depth > MAX_DEPTH {
            return Err(format!(
                "the pickle nests objects more than {MAX_DEPTH} levels deep"
            ));
        }
        self.stack.push(Item::Obj { objects, depth });
        Ok(())
    }

    /// Pushes an object that this opcode creates on top of existing ones (one new object).
    fn push(&mut self, objects: u64, depth: u32) -> Result<(), String> {
        self.push_made(objects, depth, 1)
    }

    fn pop(&mut self) -> Result<(u64, u32), String> {
        match self.stack.pop() {
            Some(Item::Obj { objects, depth }) => Ok((objects, depth)),
            Some(Item::Mark) => Err("an opcode found a mark where it needs an object".into()),
            None => Err("an opcode found the stack empty".into()),
        }
    }

    fn pop_to_mark(&mut self) -> Result<(u64, u32, usize), String> {
        let (mut objects, mut depth, mut count) = (0u64, 0u32, 0usize);
        loop {
            match self.stack.pop() {
                Some(Item::Mark) => return Ok((objects, depth, count)),
                Some(Item::Obj {
                    objects: o,
                    depth: d,
                }) => {
                    objects = objects.saturating_add(o);
                    depth = depth.max(d);
                    count += 1;
                }
                None => return Err("an opcode found no mark on the stack".into()),
            }
        }
    }

    /// Adds `objects` (of depth `depth`) into the container on top of the stack.
    fn grow_top(&mut self, objects: u64, depth: u32) -> Result<(), String> {
        match self.stack.last_mut() {
            Some(Item::Obj {
                objects: o,
                depth: d,
            }) => {
                *o = o.saturating_add(objects);
                *d = (*d).max(depth + 1);
                if *d > MAX_DEPTH {
                    return Err(format!(
                        "the pickle nests objects more than {MAX_DEPTH} levels deep"
                    ));
                }
                Ok(())
            }
            _ => Err("an opcode found no container on the stack".into()),
        }
    }

    fn memo_get(&mut self, id: u32) -> Result<(), String> {
        let (objects, depth) = *self
            .memo
            .get(&id)
            .ok_or_else(|| format!("the pickle reads memo entry {id}, which was never written"))?;
        // candle hands out a copy.
        self.push_made(objects, depth, objects)
    }

    fn memo_put(&mut self, id: u32) -> Result<(), String> {
        match self.stack.last() {
            Some(&Item::Obj { objects, depth }) => {
                // candle stores a copy.
                self.made = self.made.saturating_add(objects);
                if self.made > MAX_OBJECTS {
                    return Err(format!(
                        "the pickle would build more than {MAX_OBJECTS} objects (a pickle bomb?)"
                    ));
                }
                self.memo.insert(id, (objects, depth));
                Ok(())
            }
            _ => Err("a memo opcode found no object on the stack".into()),
        }
    }

    /// Walks the opcodes up to STOP.
    fn run(&mut self) -> Result<(), String> {
        loop {
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    self.take(1)?;
                }
                b'c' => {
                    self.line()?;
                    self.line()?;
                    self.push(1, 0)?;
                }
                b'K' => {
                    self.take(1)?;
                    self.push(1, 0)?;
                }
                b'M' => {
                    self.take(2)?;
                    self.push(1, 0)?;
                }
                b'J' => {
                    self.take(4)?;
                    self.push(1, 0)?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(1, 0)?;
                }
                b'X' => {
                    let len = self.u32()? as usize;
                    if len > self.bytes.len() - self.pos {
                        return Err(format!(
                            "a string at byte {} claims {len} bytes, more than the pickle holds",
                            self.pos
                        ));
                    }
                    self.take(len)?;
                    self.push(1, 0)?;
                }
                0x8a => {
                    let n = self.take(1)?[0] as usize;
                    if n > 8 {
                        return Err(format!("a LONG1 integer of {n} bytes is not supported"));
                    }
                    self.take(n)?;
                    self.push(1, 0)?;
                }
                b'Q' => {
                    let (o, d) = self.pop()?;
                    self.push(o + 1, d + 1)?;
                }
                b't' | b'd' => {
                    let (o, d, _) = self.pop_to_mark()?;
                    self.push(o + 1, d + 1)?;
                }
                0x85..=0x87 => {
                    let (mut objects, mut depth) = (1u64, 0u32);
                    for _ in 0..(op - 0x84) {
                        let (o, d) = self.pop()?;
                        objects = objects.saturating_add(o);
                        depth = depth.max(d);
                    }
                    self.push(objects, depth + 1)?;
                }
                0x88 | 0x89 | b'N' | b'}' | b']' | b')' => self.push(1, 0)?,
                b'(' => self.stack.push(Item::Mark),
                b'a' => {
                    let (o, d) = self.pop()?;
                    self.grow_top(o, d)?;
                }
                b's' => {
                    let (o1, d1) = self.pop()?;
                    let (o2, d2) = self.pop()?;
                    self.grow_top(o1.saturating_add(o2), d1.max(d2))?;
                }
                b'e' | b'u' => {
                    let (o, d, _) = self.pop_to_mark()?;
                    self.grow_top(o, d)?;
                }
                b'R' | b'b' | 0x81 => {
                    let (o1, d1) = self.pop()?;
                    let (o2, d2) = self.pop()?;
                    self.push(o1.saturating_add(o2).saturating_add(1), d1.max(d2) + 1)?;
                }
                b'h' => {
                    let id = self.take(1)?[0] as u32;
                    self.memo_get(id)?;
                }
                b'j' => {
                    let id = self.u32()?;
                    self.memo_get(id)?;
                }
                b'q' => {
                    let id = self.take(1)?[0] as u32;
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memo_put(id)?;
                }
                b'.' => return Ok(()),
                // An opcode candle does not know: candle refuses it with its own message.
                _ => return Ok(()),
            }
        }
    }
}

/// Checks a pickle as described in the module documentation; the error says what is wrong.
pub(crate) fn scan(bytes: &[u8]) -> Result<(), String> {
    Scan {
        bytes,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        made: 0,
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_dictionary_passes() {
        // {'a': (1, 2)} in protocol 2.
        let p = b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01K\x02\x86q\x01s.";
        assert_eq!(scan(p), Ok(()));
    }

    #[test]
    fn a_string_longer_than_the_pickle_is_refused() {
        let p = b"\x80\x02X\xff\xff\xff\xffabc.";
        assert!(scan(p).unwrap_err().contains("claims 4294967295 bytes"));
    }

    #[test]
    fn memoised_copies_that_double_are_refused() {
        // x = (); then 40 times: memoise x, x = (x, x) built from two memo copies.
        let mut p = b"\x80\x02)".to_vec();
        for _ in 0..40 {
            p.extend_from_slice(b"q\x00h\x00\x86");
        }
        p.push(b'.');
        assert!(scan(&p).unwrap_err().contains("pickle bomb"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = b"\x80\x02)".to_vec();
        p.extend(std::iter::repeat_n(0x85u8, 5000));
        p.push(b'.');
        assert!(scan(&p).unwrap_err().contains("levels deep"));
    }

    #[test]
    fn truncated_and_unbalanced_pickles_are_refused() {
        assert!(scan(b"\x80").is_err());
        assert!(scan(b"\x80\x02t.").is_err());
        assert!(scan(b"\x80\x02h\x05.").is_err());
        assert!(scan(b"\x80\x02K").is_err());
    }
}
