package main

import (
	"errors"
	"fmt"
	"os/user"
	"strconv"
	"strings"
)

// userSpec is the identity --user switches to.
type userSpec struct {
	spec     string // as given, for logs
	uid, gid int
}

// parseUser reads NAME|UID[:GROUP|GID]. A name is looked up in the user
// database, and gives the primary group when none is given; so does a UID
// that has an entry. A UID without one needs its GID spelled out. Root is
// refused: switching to it would drop nothing.
func parseUser(spec string) (*userSpec, error) {
	who, group, hasGroup := strings.Cut(spec, ":")
	if who == "" || (hasGroup && group == "") {
		return nil, errors.New("want NAME, UID, NAME:GID or UID:GID")
	}
	u := &userSpec{spec: spec, gid: -1}
	if id, err := strconv.ParseUint(who, 10, 31); err == nil {
		u.uid = int(id)
		if pw, err := user.LookupId(who); err == nil {
			u.gid, _ = strconv.Atoi(pw.Gid)
		}
	} else {
		pw, err := user.Lookup(who)
		if err != nil {
			return nil, err
		}
		u.uid, _ = strconv.Atoi(pw.Uid)
		u.gid, _ = strconv.Atoi(pw.Gid)
	}
	if hasGroup {
		if id, err := strconv.ParseUint(group, 10, 31); err == nil {
			u.gid = int(id)
		} else {
			gr, err := user.LookupGroup(group)
			if err != nil {
				return nil, err
			}
			u.gid, _ = strconv.Atoi(gr.Gid)
		}
	}
	if u.gid < 0 {
		return nil, fmt.Errorf("uid %d has no entry in the user database: give its group too (UID:GID)", u.uid)
	}
	if u.uid == 0 || u.gid == 0 {
		return nil, errors.New("switching to root or group 0 drops nothing: name an unprivileged user")
	}
	return u, nil
}
