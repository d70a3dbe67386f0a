package layering

import (
	"cmp"
	"encoding/binary"
	"maps"
	"slices"
)

// autoLayer is size-first grouping, as nixpkgs' dockerTools does it today:
// the largest paths ("primaries") get layers of their own, and every other
// path is grouped with the paths that exactly the same primaries need. As
// many primaries are taken, largest first, as the budget allows. It needs
// no external data. (Making the requested packages primaries too was
// measured: it halves reuse when the closure is larger than the budget.)
func (g *graph) autoLayer(budget int) [][]int64 {
	candidates := make([]int64, 0, len(g.paths))
	for n := int64(1); n <= int64(len(g.paths)); n++ {
		candidates = append(candidates, n)
	}
	slices.SortFunc(candidates, func(a, b int64) int {
		if c := cmp.Compare(g.size(b), g.size(a)); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	// Count groups incrementally while choosing: a path's set of primaries
	// is summed up in a 64-bit fingerprint (xor of the primaries' hashes),
	// so adding a primary touches only what it reaches. The final groups
	// are then made exactly from the chosen primaries.
	n := len(g.paths)
	isPrimary := make([]bool, n+1)
	print := make([]uint64, n+1)
	count := map[uint64]int{}
	add := func(p int64) {
		h := fingerprint(g.paths[p-1].Path)
		for _, m := range g.reach(p) {
			if isPrimary[m] {
				continue
			}
			count[print[m]]--
			if count[print[m]] == 0 {
				delete(count, print[m])
			}
			print[m] ^= h
			count[print[m]]++
		}
	}
	for m := 1; m <= n; m++ {
		count[0]++
	}
	var primaries []int64
	makePrimary := func(p int64) {
		count[print[p]]--
		if count[print[p]] == 0 {
			delete(count, print[p])
		}
		isPrimary[p] = true
		primaries = append(primaries, p)
		add(p)
	}
	// Largest first, until the next primary would make too many layers.
	for _, c := range candidates {
		if isPrimary[c] {
			continue
		}
		if len(primaries)+len(count) >= budget {
			break
		}
		reached := g.reach(c)
		saved := make([]uint64, len(reached))
		for i, m := range reached {
			saved[i] = print[m]
		}
		savedCount := maps.Clone(count)
		makePrimary(c)
		if len(primaries)+len(count) > budget {
			for i, m := range reached {
				print[m] = saved[i]
			}
			count = savedCount
			isPrimary[c] = false
			primaries = primaries[:len(primaries)-1]
			break
		}
	}
	slices.Sort(primaries)
	return g.groupByPrimaries(primaries)
}

// fingerprint is a path's 64-bit FNV-1a hash.
func fingerprint(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// groupByPrimaries makes a layer of each primary and groups every other
// path by the set of primaries it is reachable from.
func (g *graph) groupByPrimaries(primaries []int64) [][]int64 {
	isPrimary := map[int64]bool{}
	for _, p := range primaries {
		isPrimary[p] = true
	}
	needers := make([][]int64, len(g.paths)+1)
	for _, p := range primaries {
		for _, n := range g.reach(p) {
			if !isPrimary[n] {
				needers[n] = append(needers[n], p)
			}
		}
	}
	byKey := map[string][]int64{}
	var keys []string
	var buf []byte
	for n := int64(1); n <= int64(len(g.paths)); n++ {
		if isPrimary[n] {
			continue
		}
		buf = buf[:0]
		for _, p := range needers[n] {
			buf = binary.LittleEndian.AppendUint64(buf, uint64(p))
		}
		k := string(buf)
		if _, ok := byKey[k]; !ok {
			keys = append(keys, k)
		}
		byKey[k] = append(byKey[k], n)
	}
	groups := make([][]int64, 0, len(primaries)+len(keys))
	for _, p := range primaries {
		groups = append(groups, []int64{p})
	}
	for _, k := range keys {
		groups = append(groups, byKey[k])
	}
	return groups
}
