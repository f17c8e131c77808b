//! POSIX ACLs, kept as Linux keeps them: in the extended attributes
//! `system.posix_acl_access` and `system.posix_acl_default`, in the
//! kernel's own format (`posix_acl_xattr_header`: version 2, then entries
//! of tag u16, permissions u16, id u32). The kernel checks permissions
//! against them (the mount asks for `FUSE_POSIX_ACL`); the filesystem
//! keeps them and the mode in step, as `posix_acl_update_mode`,
//! `posix_acl_chmod` and `posix_acl_create` do:
//!
//! * setting an access ACL sets the mode's permission bits from it (the
//!   group bits from the mask entry when there is one), and one that says
//!   no more than the mode is not stored;
//! * `chmod` sets the owner, mask (or group) and other entries of the
//!   access ACL;
//! * a file made in a directory with a default ACL gets that ACL, its
//!   entries cut to the mode it was made with (the umask is not applied
//!   then); a directory gets it as its default ACL too;
//! * a default ACL is for directories only.

use super::{Fs, Ino, Stage, State};
use crate::error::{Error, Result};
use crate::format::Inode;

/// An inode's extended attributes: (name, value) pairs.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The attribute names.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL, its entries in the order stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Acl(Vec<(u16, u16, u32)>);

impl Acl {
    /// Read an ACL in the kernel's xattr format; `EINVAL` when it is not
    /// one (as `posix_acl_from_xattr` and `posix_acl_valid` say).
    pub(super) fn parse(bytes: &[u8]) -> Result<Acl> {
        let bad = || Error::Invalid("not a valid POSIX ACL");
        if bytes.len() < 4 || !(bytes.len() - 4).is_multiple_of(8) {
            return Err(bad());
        }
        if u32::from_le_bytes(bytes[..4].try_into().expect("4")) != VERSION {
            return Err(bad());
        }
        let entries: Vec<(u16, u16, u32)> = bytes[4..]
            .chunks(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    u32::from_le_bytes(e[4..8].try_into().expect("4")),
                )
            })
            .collect();
        let count = |tag: u16| entries.iter().filter(|e| e.0 == tag).count();
        let named = count(USER) + count(GROUP);
        let valid = entries
            .iter()
            .all(|e| [USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&e.0) && e.1 <= 7)
            && count(USER_OBJ) == 1
            && count(GROUP_OBJ) == 1
            && count(OTHER) == 1
            && count(MASK) <= 1
            && (named == 0 || count(MASK) == 1);
        if !valid {
            return Err(bad());
        }
        Ok(Acl(entries))
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in &self.0 {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Whether the mode says all this ACL says (owner, group, other only).
    fn is_mode(&self) -> bool {
        self.0.len() == 3
    }

    /// The entry that holds the group permission bits of the mode: the
    /// mask if there is one, else the owning group's.
    fn group_entry(&self) -> u16 {
        if self.0.iter().any(|e| e.0 == MASK) {
            MASK
        } else {
            GROUP_OBJ
        }
    }

    /// The mode's permission bits this ACL implies.
    fn mode_bits(&self) -> u32 {
        let perm = |tag: u16| self.0.iter().find(|e| e.0 == tag).map_or(0, |e| e.1 as u32);
        perm(USER_OBJ) << 6 | perm(self.group_entry()) << 3 | perm(OTHER)
    }

    /// `chmod`: the owner, mask (or group) and other entries take `mode`'s bits.
    fn chmod(&mut self, mode: u32) {
        let group = self.group_entry();
        for e in &mut self.0 {
            match e.0 {
                USER_OBJ => e.1 = (mode >> 6 & 7) as u16,
                OTHER => e.1 = (mode & 7) as u16,
                tag if tag == group => e.1 = (mode >> 3 & 7) as u16,
                _ => {}
            }
        }
    }

    /// `posix_acl_create_masq`: the inherited ACL's entries cut to the
    /// mode the file is made with, and that mode cut to the ACL.
    fn create_masq(&mut self, mode: &mut u32) {
        let group = self.group_entry();
        let mut bits = 0;
        for e in &mut self.0 {
            let shift = match e.0 {
                USER_OBJ => 6,
                OTHER => 0,
                tag if tag == group => 3,
                _ => continue,
            };
            e.1 &= (*mode >> shift & 7) as u16;
            bits |= (e.1 as u32) << shift;
        }
        *mode = (*mode & !0o777) | bits;
    }
}

impl Fs {
    /// Set ACL `name` of `ino` in the xattr list `attrs` (a change in
    /// progress), and the mode with it: see the module docs.
    pub(super) fn set_acl(
        &self,
        st: &mut State,
        stage: &mut Stage,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        attrs: &mut Xattrs,
    ) -> Result<()> {
        let acl = Acl::parse(value)?;
        let mut inode = self.inode(st, ino)?;
        if name == DEFAULT {
            if !inode.is_dir() {
                return Err(Error::NotPermitted("a default ACL is for directories only"));
            }
            put(attrs, DEFAULT, Some(acl.encode()));
            return Ok(());
        }
        inode.mode = (inode.mode & !0o777) | acl.mode_bits();
        self.put_inode(st, stage, ino, inode);
        put(attrs, ACCESS, (!acl.is_mode()).then(|| acl.encode()));
        Ok(())
    }

    /// `chmod` of an inode whose xattrs are `attrs`: its access ACL follows
    /// the new mode. Whether the list changed.
    pub(super) fn chmod_acl(attrs: &mut [(Vec<u8>, Vec<u8>)], mode: u32) -> bool {
        let Some((_, value)) = attrs.iter_mut().find(|(n, _)| n == ACCESS) else {
            return false;
        };
        let Ok(mut acl) = Acl::parse(value) else {
            return false;
        };
        acl.chmod(mode);
        *value = acl.encode();
        true
    }

    /// The xattrs a new `inode` (mode as asked) made in `parent` inherits
    /// from the parent's default ACL, its mode cut to it; none when the
    /// parent has none. Whether there was one.
    pub(super) fn inherit_acl(
        &self,
        st: &mut State,
        parent: Ino,
        inode: &mut Inode,
    ) -> Result<Option<Xattrs>> {
        let Some(default) = self.default_acl(st, parent)? else {
            return Ok(None);
        };
        let mut attrs = Vec::new();
        if inode.is_dir() {
            attrs.push((DEFAULT.to_vec(), default.encode()));
        }
        let mut access = default;
        let mut mode = inode.mode;
        access.create_masq(&mut mode);
        inode.mode = mode;
        if !access.is_mode() {
            attrs.push((ACCESS.to_vec(), access.encode()));
        }
        Ok(Some(attrs))
    }

    fn default_acl(&self, st: &mut State, dir: Ino) -> Result<Option<Acl>> {
        let attrs = self.xattrs(st, dir)?;
        Ok(attrs
            .iter()
            .find(|(n, _)| n == DEFAULT)
            .and_then(|(_, v)| Acl::parse(v).ok()))
    }

    /// Whether directory `dir` has a default ACL (then a file made in it
    /// takes its permissions from that, and no umask applies).
    pub fn has_default_acl(&self, dir: Ino) -> Result<bool> {
        let mut st = self.lock()?;
        Ok(self.default_acl(&mut st, dir)?.is_some())
    }
}

/// Set (`Some`) or remove (`None`) attribute `name` in `attrs`.
fn put(attrs: &mut Xattrs, name: &[u8], value: Option<Vec<u8>>) {
    attrs.retain(|(n, _)| n != name);
    if let Some(value) = value {
        attrs.push((name.to_vec(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl(entries.to_vec())
    }

    #[test]
    fn parse_checks_what_the_kernel_checks() {
        let good = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 4, 1000),
            (GROUP_OBJ, 4, 0),
            (MASK, 6, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(Acl::parse(&good.encode()).unwrap(), good);
        // A named entry without a mask, a missing owner, a bad version.
        let no_mask = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 4, 1000),
            (GROUP_OBJ, 4, 0),
            (OTHER, 0, 0),
        ]);
        assert!(Acl::parse(&no_mask.encode()).is_err());
        assert!(Acl::parse(&acl(&[(GROUP_OBJ, 4, 0), (OTHER, 0, 0)]).encode()).is_err());
        let mut v1 = good.encode();
        v1[0] = 1;
        assert!(Acl::parse(&v1).is_err());
        assert!(Acl::parse(&good.encode()[..10]).is_err());
    }

    #[test]
    fn mode_chmod_and_create_follow_the_mask() {
        let mut a = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 6, 0),
            (OTHER, 4, 0),
        ]);
        assert_eq!(a.mode_bits(), 0o764, "the group bits are the mask's");
        a.chmod(0o750);
        assert_eq!(a.0[3], (MASK, 5, 0));
        assert_eq!(a.0[2], (GROUP_OBJ, 5, 0), "the owning group's entry stays");
        let mut mode = libc::S_IFREG | 0o640;
        a.create_masq(&mut mode);
        assert_eq!(mode, libc::S_IFREG | 0o640);
        assert_eq!(a.0[4], (OTHER, 0, 0));
    }
}
