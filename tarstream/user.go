package tarstream

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// User is who an image's processes run as. The zero User is root, the
// default: its images hold no account files of their own and their
// layers are what they were before users existed. Any other user gets
// /etc/passwd, /etc/group and a home directory in the symlink layer.
type User struct {
	Name     string
	UID, GID uint32
}

// DefaultUID is the uid and gid of a user given by name alone, as the
// first account of most distributions.
const DefaultUID = 1000

// nobodyID is the uid and gid of nobody, which every image's account files
// name.
const nobodyID = 65534

// userName is what useradd accepts by default, and nothing a passwd line
// or a path could be confused by.
var userName = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

// ParseUser reads a user as configured: "root" (or "", or "0:0"), a name
// (uid and gid DefaultUID), "uid:gid" (named "user"), or "name:uid:gid"
// (String's form).
func ParseUser(s string) (User, error) {
	fields := strings.Split(s, ":")
	var u User
	switch len(fields) {
	case 1:
		u = User{Name: fields[0], UID: DefaultUID, GID: DefaultUID}
		if u.Name == "" || u.Name == "root" {
			return User{}, nil
		}
	case 2:
		if s == "0:0" {
			return User{}, nil
		}
		fields = append([]string{"user"}, fields...)
		fallthrough
	case 3:
		u.Name = fields[0]
		for i, id := range []*uint32{&u.UID, &u.GID} {
			n, err := strconv.ParseUint(fields[i+1], 10, 32)
			if err != nil || n == 1<<32-1 || strconv.FormatUint(n, 10) != fields[i+1] {
				return User{}, fmt.Errorf("user %q: %q is not a uid or gid (a decimal number below 4294967295): %w", s, fields[i+1], errdefs.ErrInvalidArgument)
			}
			*id = uint32(n)
		}
	default:
		return User{}, fmt.Errorf("user %q: want a name, uid:gid or name:uid:gid: %w", s, errdefs.ErrInvalidArgument)
	}
	switch {
	case !userName.MatchString(u.Name):
		return User{}, fmt.Errorf("user %q: the name %q is not a user name (lower-case letters, digits, _ and -, starting with a letter or _, at most 32): %w", s, u.Name, errdefs.ErrInvalidArgument)
	case u.UID == 0 || u.Name == "root":
		if u == (User{Name: "root"}) {
			return User{}, nil
		}
		return User{}, fmt.Errorf("user %q: uid 0 and the name root are root's (user = \"root\", the default): %w", s, errdefs.ErrInvalidArgument)
	case u.UID == nobodyID || u.GID == nobodyID || u.Name == "nobody" || u.Name == "nogroup":
		return User{}, fmt.Errorf("user %q: uid and gid 65534 and the names nobody and nogroup are nobody's, which every image has: %w", s, errdefs.ErrInvalidArgument)
	}
	return u, nil
}

// Root reports whether u is root, the zero User.
func (u User) Root() bool { return u == User{} }

// String is u as "name:uid:gid", which ParseUser reads back, or "root".
func (u User) String() string {
	if u.Root() {
		return "root"
	}
	return fmt.Sprintf("%s:%d:%d", u.Name, u.UID, u.GID)
}

// Key is u as keys and labels hold it: String, but "" for root, whose
// keys are what they were before users.
func (u User) Key() string {
	if u.Root() {
		return ""
	}
	return u.String()
}

// Spec is u as an image config's User: numeric, so that the runtime needs
// no lookup in the image.
func (u User) Spec() string {
	if u.Root() {
		return ""
	}
	return fmt.Sprintf("%d:%d", u.UID, u.GID)
}

// Home is u's home directory, in the image.
func (u User) Home() string {
	if u.Root() {
		return "/root"
	}
	return "/home/" + u.Name
}

// passwd and group are the account files of an image run as u: root, u
// and nobody, as nixpkgs' dockerTools.fakeNss has them.
func (u User) passwd() string {
	return "root:x:0:0:root:/root:/bin/sh\n" +
		fmt.Sprintf("%s:x:%d:%d::%s:/bin/sh\n", u.Name, u.UID, u.GID, u.Home()) +
		"nobody:x:65534:65534:nobody:/var/empty:/bin/false\n"
}

func (u User) group() string {
	g := "root:x:0:\n"
	if u.GID != 0 {
		g += fmt.Sprintf("%s:x:%d:\n", u.Name, u.GID)
	}
	return g + "nogroup:x:65534:\n"
}
