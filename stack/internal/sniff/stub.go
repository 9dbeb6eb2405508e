// Package sniff is a placeholder until the sniff branch lands.
package sniff

import "errors"

var ErrMore = errors.New("more")

func TLS(b []byte) (string, error)  { return "", errors.New("no") }
func HTTP(b []byte) (string, error) { return "", errors.New("no") }

type QUICHello struct{}

func (q *QUICHello) Feed(b []byte) (string, error) { return "", errors.New("no") }
