//! Who is in which group of the current epoch, in the groups' index order — as the real rank
//! builds its communicators from an epoch's member list: index = place in the view's member
//! list (ascending rank ids), one subgroup per data centre in that order (index 0 leads it),
//! and the leaders' subgroup.
//!
//! Channels: 0 is the group of all members (`semisync`: the DCs' leaders); 1 the rank's data
//! centre (`semisync`); 2 all members (`semisync` with membership, for the boundary agreement).

const NONE: usize = usize::MAX;

/// The groups' members, and each slot's place in them.
#[derive(Clone, Debug, Default)]
pub(super) struct Layout {
    /// All members in index order (`None`: every rank, index = rank).
    all: Option<Vec<usize>>,
    all_pos: Vec<usize>,
    /// `semisync`: each data centre's members in index order (empty otherwise).
    pub(super) dc_members: Vec<Vec<usize>>,
    dc_pos: Vec<usize>,
    /// `semisync`: the leaders (the first member of each data centre that has members).
    pub(super) leaders: Vec<usize>,
    leader_pos: Vec<usize>,
    semisync: bool,
}

impl Layout {
    /// Every rank, index = rank; `semisync`: data centres of `per_dc` ranks.
    pub(super) fn everyone(world: usize, per_dc: usize, semisync: bool) -> Layout {
        let mut l = Layout::of(&(0..world).collect::<Vec<_>>(), world, per_dc, semisync);
        l.all = None;
        l
    }

    /// The groups of an epoch whose members are `members` (slots, in index order).
    pub(super) fn of(members: &[usize], world: usize, per_dc: usize, semisync: bool) -> Layout {
        let mut all_pos = vec![NONE; world];
        for (i, m) in members.iter().enumerate() {
            all_pos[*m] = i;
        }
        let (mut dc_members, mut dc_pos, mut leaders, mut leader_pos) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if semisync {
            dc_members = vec![Vec::new(); world.div_ceil(per_dc.max(1))];
            dc_pos = vec![NONE; world];
            for m in members {
                let d = &mut dc_members[m / per_dc.max(1)];
                dc_pos[*m] = d.len();
                d.push(*m);
            }
            leaders = dc_members.iter().filter_map(|d| d.first().copied()).collect();
            leader_pos = vec![NONE; world];
            for (i, l) in leaders.iter().enumerate() {
                leader_pos[*l] = i;
            }
        }
        Layout { all: Some(members.to_vec()), all_pos, dc_members, dc_pos, leaders, leader_pos, semisync }
    }

    /// The slot at `index` of slot `r`'s group `channel` (`usize::MAX`: none).
    pub(super) fn rank(&self, r: usize, channel: u8, index: usize, per_dc: usize) -> usize {
        let at = |v: &[usize]| v.get(index).copied().unwrap_or(NONE);
        match (channel, self.semisync) {
            (1, true) => self.dc_members.get(r / per_dc.max(1)).map_or(NONE, |d| at(d)),
            (0, true) => at(&self.leaders),
            _ => self.all.as_deref().map_or(index, at),
        }
    }

    /// Whether group `channel`'s indices differ from ranks.
    pub(super) fn maps(&self, channel: u8) -> bool {
        self.semisync || channel != 0 || self.all.is_some()
    }

    /// Where slot `rank` is in slot `r`'s group `channel` (`None`: not in it).
    pub(super) fn index(&self, r: usize, channel: u8, rank: usize, per_dc: usize) -> Option<usize> {
        let pos = |v: &[usize]| v.get(rank).copied().filter(|p| *p != NONE);
        match (channel, self.semisync) {
            (1, true) => pos(&self.dc_pos).filter(|_| r / per_dc.max(1) == rank / per_dc.max(1)),
            (1, false) => None,
            (0, true) => pos(&self.leader_pos),
            _ if self.all.is_none() => Some(rank),
            _ => pos(&self.all_pos),
        }
    }
}
